"""The book worker and the ork as real processes, run with one command each."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from swarmd.errors import ERR_FORBIDDEN, SwarmdError
from swarmd.node.identity import Identity
from swarmd.rpc import connect
from tests.conftest import Daemon, swarmd_env

T = 30.0
BOOKS = ("examples/book_worker.py",)


def _ready(p: Daemon) -> tuple[bytes, int]:
    doc = p.wait_event("ready")
    return bytes.fromhex(doc["public_key"]), int(doc["ports"]["rpc"])


async def test_book_worker_one_command_serves_and_replays(tmp_path: Path) -> None:
    data = tmp_path / "books"
    worker = Daemon("--data-dir", str(data), "--snapshot-interval", "0.05", "--rack-id", "shelf-1", command=BOOKS)
    ork_proc: Daemon | None = None
    try:
        ready = worker.wait_event("ready")
        key, port = bytes.fromhex(ready["public_key"]), int(ready["ports"]["rpc"])
        dht_port = int(ready["ports"]["dht"])
        peer = await connect(None, "127.0.0.1", port, remote_public_key=key, timeout=T)
        try:
            made = await peer.call("registerThing", {"id": "dune", "info": {"title": "Dune"}}, timeout=T)
            assert made["type"] == "book" and "t-book" in made["tags"]
            await peer.call("updateThing", {"id": "dune", "info": {"checked_out_by": "ana"}}, timeout=T)
            deadline = time.monotonic() + T
            while True:  # the worker's own snapshot loop fills the log
                tail = await peer.call("tailLog", {"id": "dune", "limit": 1}, timeout=T)
                if tail and tail[0]["snap"]["is_checked_out"]:
                    break
                assert time.monotonic() < deadline, "no snapshot of a checked-out book"
                await _sleep_a_little()
            assert set(tail[0]["snap"]) == {"is_available", "is_checked_out", "ts"}
        finally:
            await peer.close()

        # an ork, also one command, joins the worker's swarm and finds the rack on RACKS by itself
        ork_proc = Daemon("--data-dir", str(tmp_path / "ork"), "--bootstrap", f"127.0.0.1:{dht_port}",
                          "--discover-interval", "0.2", command=("-m", "swarmd.plugins", "ork"))
        okey, oport = _ready(ork_proc)
        op = await connect(None, "127.0.0.1", oport, remote_public_key=okey, timeout=T)
        try:
            deadline = time.monotonic() + T
            while not (racks := await op.call("listRacks", {"keys": True}, timeout=T)):
                assert time.monotonic() < deadline, "the ork never found the rack on RACKS"
                await _sleep_a_little()
            assert [(r["id"], r["source"], r["public_key"]) for r in racks] == [("shelf-1", "dht", key.hex())]
            out = await op.call("listThings", {}, timeout=T)
            assert [(t["id"], t["rack"]) for t in out["things"]] == [("dune", "shelf-1")]
            # and a rack registered by hand, reached at its address
            await op.call("registerRack", {"id": "shelf", "public_key": key.hex(),
                                           "addresses": [f"127.0.0.1:{port}"]}, timeout=T)
            out = await op.call("listThings", {}, timeout=T)
            assert [(t["id"], t["rack"]) for t in out["things"]] == [("dune", "shelf")]  # manual shadows dht
        finally:
            await op.close()
        assert ork_proc.stop() == 0
        assert worker.stop() == 0

        # restart: the book is replayed from SQLite
        worker = Daemon("--data-dir", str(data), "--snapshot-interval", "0", "--no-announce", command=BOOKS)
        key2, port2 = _ready(worker)
        assert key2 == key  # same identity from the same data dir
        peer = await connect(None, "127.0.0.1", port2, remote_public_key=key, timeout=T)
        try:
            listed = await peer.call("listThings", {"fields": {"info": 1}}, timeout=T)
            assert listed == [{"id": "dune", "info": {"title": "Dune", "checked_out_by": "ana"}}]
        finally:
            await peer.close()
        assert worker.stop() == 0
    finally:
        worker.kill()
        if ork_proc is not None:
            ork_proc.kill()


async def test_book_worker_refuses_writes_to_read_only_keys_from_its_config(tmp_path: Path) -> None:
    admin, viewer = Identity.generate(), Identity.generate()
    worker = Daemon("--data-dir", str(tmp_path), "--no-announce", command=BOOKS,
                    env=swarmd_env(SWARMD_ACCESS_ALLOW=admin.public_hex, SWARMD_ACCESS_ALLOW_READ_ONLY=viewer.public_hex))
    try:
        key, port = _ready(worker)
        full = await connect(admin, "127.0.0.1", port, remote_public_key=key, timeout=T)
        ro = await connect(viewer, "127.0.0.1", port, remote_public_key=key, timeout=T)
        try:
            await full.call("registerThing", {"id": "dune", "info": {"title": "Dune"}}, timeout=T)
            assert [t["id"] for t in await ro.call("listThings", {}, timeout=T)] == ["dune"]
            with pytest.raises(SwarmdError) as ei:
                await ro.call("forgetThings", {"all": True}, timeout=T)
            assert ei.value.code == ERR_FORBIDDEN
            assert [t["id"] for t in await full.call("listThings", {}, timeout=T)] == ["dune"]
        finally:
            await full.close()
            await ro.close()
        assert worker.stop() == 0
    finally:
        worker.kill()


async def _sleep_a_little() -> None:
    import asyncio

    await asyncio.sleep(0.05)  # polling a remote log: there is no event to await across processes
