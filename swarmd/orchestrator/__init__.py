"""swarmd.orchestrator"""
