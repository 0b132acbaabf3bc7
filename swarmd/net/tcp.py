"""TCP listen/dial helpers for secure connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from swarmd.errors import ERR_CLOSED, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.net.config import NetConfig
from swarmd.net.connection import SecureConnection
from swarmd.node.identity import Identity


async def dial(
    identity: Identity,
    host: str,
    port: int,
    *,
    remote_public_key: bytes | None = None,
    config: NetConfig | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - part of the API; enforced with timeout_at
    setup: Callable[[SecureConnection], None] | None = None,
) -> SecureConnection:
    """Connect, run the handshake, return the established connection.

    `setup` runs on the connection before any byte arrives, so the layer above
    can attach its callbacks without missing a message that follows the
    handshake in the same TCP segment.
    """
    loop = asyncio.get_running_loop()
    conn = SecureConnection(
        identity, initiator=True, remote_public_key=remote_public_key, config=config, loop=loop
    )
    if setup is not None:
        setup(conn)
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            await loop.create_connection(lambda: conn, host, port)
    except TimeoutError:
        conn.close(
            SwarmdError(ERR_TIMEOUT, f"TCP connect to {host}:{port} timed out after {timeout:g} s"),
            tell_peer=False,
        )
        raise conn.error from None  # type: ignore[misc]
    except OSError as e:
        err = SwarmdError(ERR_UNAVAILABLE, f"cannot connect to {host}:{port}: {e.strerror or e}")
        conn.close(err, tell_peer=False)
        raise err from None
    try:
        async with asyncio.timeout_at(deadline):
            await asyncio.shield(conn.established)
    except TimeoutError:
        conn.close(
            SwarmdError(ERR_TIMEOUT, f"handshake with {host}:{port} timed out after {timeout:g} s"),
            tell_peer=False,
        )
        raise conn.error from None  # type: ignore[misc]
    except asyncio.CancelledError:
        conn.close(SwarmdError(ERR_CLOSED, "dial cancelled"), tell_peer=False)
        raise
    return conn


async def listen(
    identity: Identity,
    host: str,
    port: int,
    on_connection: Callable[[SecureConnection], None],
    *,
    config: NetConfig | None = None,
) -> asyncio.Server:
    """Accept TCP connections; on_connection(conn) runs before the handshake starts."""
    loop = asyncio.get_running_loop()

    def factory() -> SecureConnection:
        conn = SecureConnection(identity, initiator=False, config=config, loop=loop)
        on_connection(conn)
        return conn

    return await loop.create_server(factory, host, port)
