"""swarmd.worker"""
