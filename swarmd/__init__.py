"""swarmd: a peer-to-peer daemon that serves AI models.

As a library (swarmd_rpc, or swarmd's parts embedded in a program) it logs nothing until the
application asks: loguru's convention, `logger.disable("swarmd")` here. `swarmd` the command,
the daemon and swarmd.node.logging.setup_logging() enable it (as does swarmd_rpc.quiet_logs()).
"""

from loguru import logger

__version__ = "0.1.0"

logger.disable("swarmd")
