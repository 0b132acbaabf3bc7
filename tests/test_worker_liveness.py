"""Dead workers vanish (issue 17): a worker killed with SIGKILL leaves `swarmd topic lookup
swarmd/workers` and `swarmd status` within its live record's TTL (12 s), and status shows
how long ago each worker was seen."""

from __future__ import annotations

import asyncio
import json
import time

from swarmd.dht.config import DhtConfig
from swarmd.dht.node import DhtNode
from swarmd.dht.records import topic_from_name
from swarmd.node.identity import Identity
from swarmd.swarm.config import SwarmConfig
from swarmd.topics import WORKERS
from tests.conftest import run_cli
from tests.models import mlp_model


def _lookup(port: int) -> list[dict]:
    r = run_cli("topic", "lookup", "swarmd/workers", "--json", "--timeout", "3", "--bootstrap", f"127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _status(data_dir) -> dict:  # noqa: ANN001
    r = run_cli("status", "--json", "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sigkilled_worker_leaves_lookups_and_status(tmp_path, daemons):
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_model((16, 64, 4)))
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[worker]\nmodels = ["mlp={model}"]\n')
    boot = daemons("--role", "bootstrap", "--data-dir", str(tmp_path / "b"))
    port = boot.wait_event("ready")["ports"]["dht"]
    worker = daemons("--config", str(cfg), "--role", "worker", "--data-dir", str(tmp_path / "w"),
                     "--bootstrap", f"127.0.0.1:{port}")
    key = worker.wait_event("ready")["public_key"]

    deadline = time.monotonic() + 60
    while True:
        found = _lookup(port)
        if any(r["public_key"] == key for r in found):
            break
        assert time.monotonic() < deadline, f"worker never announced: {found}"
    rec = next(r for r in found if r["public_key"] == key)
    # a live record: it expires within its short TTL, however loaded the machine is
    assert rec["expires"] - time.time() <= SwarmConfig().live_record_ttl + 1.0
    st = _status(tmp_path / "b")
    [w] = [w for w in st["workers"] if w["public_key"] == key]
    assert w["state"] == "ONLINE" and w["ejected_by"] == []
    assert 0 <= w["last_seen_s"] <= 60 and 0 < w["expires_in_s"] <= SwarmConfig().live_record_ttl + 1.0

    worker.kill()  # SIGKILL: nothing withdrawn
    killed = time.monotonic()
    gone = asyncio.run(_vanishes(port, bytes.fromhex(key), killed))
    assert not any(r["public_key"] == key for r in _lookup(port))
    assert all(w["public_key"] != key for w in _status(tmp_path / "b")["workers"])
    print(f"SIGKILLed worker gone from lookups {gone:.1f}s after the kill (record TTL "
          f"{SwarmConfig().live_record_ttl:g}s)")


async def _vanishes(port: int, key: bytes, since: float) -> float:
    """Look WORKERS up every half second (one in-process DHT client, so a CLI start-up
    does not blur the figure) until key is gone; seconds since `since`."""
    dht = DhtNode(Identity.generate(), DhtConfig(host="127.0.0.1", bootstrap=[("127.0.0.1", port)], mode="client"))
    await dht.start()
    try:
        while any(r.public_key == key for r in await dht.lookup_all(topic_from_name(WORKERS, None), 3.0)):
            assert time.monotonic() - since < 60, "the killed worker is still announced"
            await asyncio.sleep(0.5)
        return time.monotonic() - since
    finally:
        await dht.stop()
