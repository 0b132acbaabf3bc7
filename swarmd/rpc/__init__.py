"""swarmd.rpc"""
