"""Methods every peer serves before its own table: ping, getInstanceId, listMethods, the grants hello.

Both a remote connection (`RpcPeer`) and a call to our own key (`LocalPeer`)
look a method up here first; the firewall does not apply to these.
"""

from __future__ import annotations

from typing import Any

from swarmd.node.trust import HELLO_EVENT
from swarmd.rpc.methods import READ, CallContext, Method


def _builtin_methods() -> dict[str, Method]:
    async def ping(ctx: CallContext, params: Any) -> Any:
        return "pong" if params is None else params

    async def get_instance_id(ctx: CallContext, params: Any) -> Any:
        return ctx.peer_conn.instance_id

    async def list_methods(ctx: CallContext, params: Any) -> Any:
        """What this peer serves, each method with its op (r/w) and whether it is a stream:
        introspection for operators (`swarmd call KEY --list`); names are not secrets, and
        the firewall still decides who may call each."""
        table = ctx.peer_conn.methods
        found = {n: m for n, m in BUILTINS.items() if n != HELLO_EVENT}
        for name in table.names() if table is not None else ():
            m = table.get(name)
            if m is not None:
                found[name] = m
        return [{"name": n, "op": m.op, "stream": m.stream} for n, m in sorted(found.items())]

    async def present_grants(ctx: CallContext, params: Any) -> Any:
        # The hello (event) a peer sends first on a connection: its role grants.
        # Inline, so they count before the next message on the connection is served.
        ctx.peer_conn._learn_grants(params)

    return {
        "ping": Method("ping", ping, READ, False, inline=True),
        "getInstanceId": Method("getInstanceId", get_instance_id, READ, False, inline=True),
        "listMethods": Method("listMethods", list_methods, READ, False),
        HELLO_EVENT: Method(HELLO_EVENT, present_grants, READ, False, inline=True),
    }


BUILTINS = _builtin_methods()
