"""Dead workers vanish (issue 17): a worker killed with SIGKILL leaves `swarmd topic lookup
swarmd/workers` and `swarmd status` within 15 s (its live record's TTL is 12 s), and status
shows how long ago each worker was seen."""

from __future__ import annotations

import asyncio
import time

from swarmd.dht.config import DhtConfig
from swarmd.dht.node import DhtNode
from swarmd.dht.records import topic_from_name
from swarmd.node.identity import Identity
from swarmd.swarm.config import SwarmConfig
from swarmd.topics import WORKERS
from tests.swarm_daemons import lookup_json, poll_until, serve_mlp, start_hub, start_worker, status_json

GONE_WITHIN_S = 15.0  # the bound: records reflect liveness within 15 s


def test_sigkilled_worker_leaves_lookups_and_status(tmp_path, daemons):
    models = serve_mlp(tmp_path)
    _, boot = start_hub(daemons, tmp_path / "b")
    port = int(boot.rpartition(":")[2])
    worker, ready = start_worker(daemons, tmp_path / "w", boot, models=models)
    key = ready["public_key"]

    found = poll_until(lambda: {r["public_key"]: r for r in lookup_json(boot) if r["public_key"] == key},
                       "the worker announced", 60)
    rec = found[key]
    # a live record: it expires within its short TTL, however loaded the machine is
    assert rec["expires"] - time.time() <= SwarmConfig().live_record_ttl + 1.0
    assert rec["ejected_by"] == [] and 0 <= rec["last_seen_s"] <= 60
    st = status_json(tmp_path / "b")
    [w] = [w for w in st["workers"] if w["public_key"] == key]
    assert w["state"] == "ONLINE" and w["ejected_by"] == []
    assert 0 <= w["last_seen_s"] <= 60 and 0 < w["expires_in_s"] <= SwarmConfig().live_record_ttl + 1.0

    worker.kill()  # SIGKILL: nothing withdrawn
    killed = time.monotonic()
    gone = asyncio.run(_vanishes(port, bytes.fromhex(key), killed))
    assert not any(r["public_key"] == key for r in lookup_json(boot))
    assert all(w["public_key"] != key for w in status_json(tmp_path / "b")["workers"])
    print(f"SIGKILLed worker gone from lookups {gone:.1f}s after the kill (record TTL "
          f"{SwarmConfig().live_record_ttl:g}s)")


async def _vanishes(port: int, key: bytes, since: float) -> float:
    """Look WORKERS up every half second (one in-process DHT client, so a CLI start-up
    does not blur the figure) until key is gone, at most GONE_WITHIN_S after `since`."""
    dht = DhtNode(Identity.generate(), DhtConfig(host="127.0.0.1", bootstrap=[("127.0.0.1", port)], mode="client"))
    await dht.start()
    try:
        while any(r.public_key == key for r in await dht.lookup_all(topic_from_name(WORKERS, None), 3.0)):
            assert time.monotonic() - since < GONE_WITHIN_S, "the killed worker is still announced"
            await asyncio.sleep(0.5)
        return time.monotonic() - since
    finally:
        await dht.stop()
