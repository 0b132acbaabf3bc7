"""swarmd.dht"""
