"""The node layer: identity, configuration, lifecycle, logging, data dir."""
