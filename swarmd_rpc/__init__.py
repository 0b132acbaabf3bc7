"""swarmd_rpc: the client library for a swarmd swarm."""
