"""swarmd.swarm"""
