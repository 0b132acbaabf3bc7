"""msgpack RPC over secure multiplexed connections.

methods = Methods()
methods.register("echo", echo, op="r")
server = RpcServer(identity, methods); await server.start()
peer = await connect(None, "127.0.0.1", server.port, remote_public_key=identity.public_key)
await peer.call("echo", b"hi", timeout=5)
"""

from swarmd.rpc.client import connect
from swarmd.rpc.config import RpcConfig
from swarmd.rpc.methods import CallContext, Firewall, Methods
from swarmd.rpc.peer import RpcPeer
from swarmd.rpc.server import RpcServer
from swarmd.rpc.stream import Stream

__all__ = ["CallContext", "Firewall", "Methods", "RpcConfig", "RpcPeer", "RpcServer", "Stream", "connect"]
