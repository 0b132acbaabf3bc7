"""`swarmd --role relay` started with the real CLI splices two clients on loopback."""

from __future__ import annotations

import asyncio
import os

from swarmd.net.relayio import new_token, open_circuit, ping_relay


async def test_relay_role_from_the_cli(daemons, tmp_path) -> None:
    d = daemons("--role", "relay", "--data-dir", str(tmp_path / "relay"), "--host", "127.0.0.1")
    ready = await asyncio.to_thread(d.wait_event, "ready", 60)
    port = ready["ports"]["relay"]
    assert await ping_relay("127.0.0.1", port, timeout=10) > 0
    tok = new_token()
    a, b = await asyncio.gather(
        open_circuit("127.0.0.1", port, tok, timeout=30), open_circuit("127.0.0.1", port, tok, timeout=30)
    )
    blob = os.urandom(1 << 20)
    a.writer.write(blob)
    a.writer.write_eof()
    assert await asyncio.wait_for(b.reader.read(-1), 30) == blob
    a.writer.close()
    b.writer.close()
    assert await asyncio.to_thread(d.stop) == 0
