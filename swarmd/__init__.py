"""swarmd: a peer-to-peer daemon that serves AI models."""

__version__ = "0.1.0"
