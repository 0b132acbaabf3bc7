"""swarmd.net"""
