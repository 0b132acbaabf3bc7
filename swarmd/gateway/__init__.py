"""swarmd.gateway"""
