"""Ten lines of swarmd RPC: a server with one method, a client that calls it.

    python examples/rpc_hello.py
"""

import asyncio

from swarmd.node.identity import Identity
from swarmd.rpc import CallContext, Methods, RpcServer
from swarmd_rpc import connect


async def main() -> None:
    methods = Methods()

    async def hello(ctx: CallContext, params: dict) -> str:
        return f"hello {params['name']}, you are {ctx.peer.hex()[:8]}"

    methods.register("hello", hello, op="r")
    server = RpcServer(Identity.generate(), methods)
    await server.start()
    peer = await connect("127.0.0.1", server.port, public_key=server.identity.public_key)
    print(await peer.call("hello", {"name": "swarm"}, timeout=5))
    await peer.close()
    await server.stop()


asyncio.run(main())
