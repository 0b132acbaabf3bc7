"""swarmd.services"""
