"""swarmd.roles"""
