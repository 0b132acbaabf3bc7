"""swarmd.store"""
