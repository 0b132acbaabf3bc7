"""Stores as real processes on loopback: replication survives kill -9, and so does an upload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from store_models import onnx_bytes, write_model

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.rpc import connect
from swarmd.store.transfer import pull_file, push_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
T = 30.0


class StoreProc:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.key = ""

    async def start(self, interval: float = 0.3) -> StoreProc:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(TESTS / "store_nodes.py"), str(self.data_dir), str(interval),
            cwd=ROOT, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        hello = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60))
        self.port, self.key = hello["port"], hello["key"]
        return self

    @property
    def addr(self) -> str:
        return f"{self.key}@127.0.0.1:{self.port}"

    async def set_peers(self, peers: list[StoreProc]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"peers {','.join(p.addr for p in peers)}\n".encode())
        await self.proc.stdin.drain()

    async def connect(self) -> Any:
        return await connect(None, "127.0.0.1", self.port, remote_public_key=bytes.fromhex(self.key), timeout=T)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                await self.kill()


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[list[StoreProc]]:
    started: list[StoreProc] = []
    yield started
    for p in started:
        await p.stop()


async def holders(stores: list[StoreProc], digest: str) -> set[str]:
    out = set()
    for s in stores:
        peer = await s.connect()
        try:
            if digest in (await peer.call("storeState", {}, timeout=T))["have"]:
                out.add(s.key)
        finally:
            await peer.close()
    return out


async def until(pred: Any, what: str) -> None:
    for _ in range(600):  # polling other processes; bounded, generous for a loaded machine
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_replication_survives_kill_9(tmp_path: Path, procs: list[StoreProc]) -> None:
    for i in range(3):
        procs.append(await StoreProc(tmp_path / f"s{i}").start())
    for p in procs:
        await p.set_peers([o for o in procs if o is not p])
    f = write_model(tmp_path / "m.onnx", seed=31, pad_floats=50_000)
    peer = await procs[0].connect()
    try:
        meta = await push_file(peer, f, "m", "1", timeout=T)
    finally:
        await peer.close()
    d = meta["digest"]

    async def two_copies(stores: list[StoreProc]) -> bool:
        return len(await holders(stores, d)) == 2

    await until(lambda: two_copies(procs), "two copies")
    have = await holders(procs, d)
    victim = next(p for p in procs if p.key in have)
    await victim.kill()
    survivors = [p for p in procs if p is not victim]
    await until(lambda: two_copies(survivors), "two copies among the survivors")
    # and each copy is the model, with its metadata
    for s in survivors:
        peer = await s.connect()
        try:
            assert (await peer.call("getModel", {"name": "m"}, timeout=T))["digest"] == d
            out = tmp_path / f"pulled-{s.key[:8]}"
            await pull_file(peer, d, out, timeout=T)
            assert out.read_bytes() == f.read_bytes()
        finally:
            await peer.close()


async def test_kill_9_mid_upload_then_restart_clean(tmp_path: Path, procs: list[StoreProc]) -> None:
    store = await StoreProc(tmp_path / "s").start(interval=3600.0)
    procs.append(store)
    data = onnx_bytes(32, pad_floats=200_000)
    digest = hashlib.sha256(data).hexdigest()
    peer = await store.connect()
    stream = await peer.open_stream("uploadModel", {"name": "k", "version": "1", "size": len(data), "sha256": digest})
    await stream.send(data[:300_000])

    async def received_some() -> bool:
        return (await peer.call("uploadStatus", {"sha256": digest}, timeout=T))["received"] >= 300_000

    await until(received_some, "the store to write the first bytes")
    await store.kill()
    with pytest.raises(SwarmdError):
        await stream.result()
    await peer.close()
    await store.start(interval=3600.0)  # same data dir, same key
    peer = await store.connect()
    try:
        with pytest.raises(SwarmdError) as e:
            await peer.call("getModel", {"name": "k"}, timeout=T)
        assert e.value.code == ERR_NOT_FOUND
        assert (await peer.call("listModels", {}, timeout=T))["models"] == []
        assert (await peer.call("uploadStatus", {"sha256": digest}, timeout=T))["received"] == 300_000
        f = tmp_path / "k.onnx"
        f.write_bytes(data)
        first: list[int] = []
        meta = await push_file(peer, f, "k", "1", progress=lambda d, t: first.append(d), timeout=T)
        assert first[0] == 300_000 and meta["digest"] == digest
    finally:
        await peer.close()
