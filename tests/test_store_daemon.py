"""`swarmd --role store` daemons, as an operator runs them: they find each other through the DHT,
replicate, and restore the factor when one is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from store_models import onnx_bytes, write_model

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.rpc import connect
from swarmd.store.transfer import push_file
from tests.conftest import run_cli, swarmd_env

T = 30.0


async def state(ready: dict[str, Any]) -> dict[str, Any]:
    peer = await connect(None, "127.0.0.1", ready["ports"]["rpc"],
                         remote_public_key=bytes.fromhex(ready["public_key"]), timeout=T)
    try:
        return await peer.call("storeState", {}, timeout=T)
    finally:
        await peer.close()


async def holders(readies: list[dict[str, Any]], digest: str) -> set[str]:
    return {r["public_key"] for r in readies if digest in (await state(r))["have"]}


async def until(pred: Any, what: str) -> None:
    for _ in range(600):  # other processes: poll, bounded and generous for a loaded machine
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_daemons_replicate_and_survive_sigkill(daemons: Any, tmp_path: Path) -> None:
    env = swarmd_env(SWARMD_STORE_REPLICATE_INTERVAL="0.5", SWARMD_STORE_REPLICATION_FACTOR="2")
    first = daemons("--role", "store", "--data-dir", str(tmp_path / "d0"), env=env)
    r0 = await asyncio.to_thread(first.wait_event, "ready")
    boot = f"127.0.0.1:{r0['ports']['dht']}"
    procs = [first] + [
        daemons("--role", "store", "--data-dir", str(tmp_path / f"d{i}"), "--bootstrap", boot, env=env)
        for i in (1, 2)
    ]
    readies = [r0] + [await asyncio.to_thread(d.wait_event, "ready") for d in procs[1:]]
    # push with the operator's CLI, through the local daemon of d0's data dir
    f = write_model(tmp_path / "m.onnx", seed=51, pad_floats=20_000)
    res = await asyncio.to_thread(run_cli, "model", "push", str(f), "--name", "m", "--data-dir", str(tmp_path / "d0"))
    assert res.returncode == 0, res.stderr
    digest = res.stdout.split()[1]

    async def two() -> bool:
        return len(await holders(readies, digest)) == 2

    await until(two, "two copies")
    have = await holders(readies, digest)
    # kill -9 a holder other than the bootstrap node
    victim = next(i for i in (1, 2) if readies[i]["public_key"] in have)
    procs[victim].kill()
    survivors = [r for i, r in enumerate(readies) if i != victim]

    async def two_left() -> bool:
        return len(await holders(survivors, digest)) == 2

    await until(two_left, "two copies among the survivors")


async def test_sigkill_mid_upload_then_restart_clean(daemons: Any, tmp_path: Path) -> None:
    args = ("--role", "store", "--data-dir", str(tmp_path / "d"))
    d = daemons(*args)
    ready = await asyncio.to_thread(d.wait_event, "ready")
    data = onnx_bytes(53, pad_floats=1_300_000)  # ~5 MiB: more than one write batch
    digest = hashlib.sha256(data).hexdigest()
    peer = await connect(None, "127.0.0.1", ready["ports"]["rpc"],
                         remote_public_key=bytes.fromhex(ready["public_key"]), timeout=T)
    stream = await peer.open_stream("uploadModel", {"name": "k", "version": "1", "size": len(data), "sha256": digest})
    await stream.send(data[:4_500_000])
    have: list[int] = []

    async def written() -> bool:
        have.append((await peer.call("uploadStatus", {"sha256": digest}, timeout=T))["received"])
        return have[-1] >= 4 << 20

    await until(written, "the store to write the first batch")
    d.kill()
    with pytest.raises(SwarmdError):
        await stream.result()
    await peer.close()
    d = daemons(*args)  # same data dir, same key
    ready = await asyncio.to_thread(d.wait_event, "ready")
    peer = await connect(None, "127.0.0.1", ready["ports"]["rpc"],
                         remote_public_key=bytes.fromhex(ready["public_key"]), timeout=T)
    try:
        with pytest.raises(SwarmdError) as e:
            await peer.call("getModel", {"name": "k"}, timeout=T)
        assert e.value.code == ERR_NOT_FOUND
        assert (await peer.call("listModels", {}, timeout=T))["models"] == []
        assert (await peer.call("uploadStatus", {"sha256": digest}, timeout=T))["received"] == have[-1]
        f = tmp_path / "k.onnx"
        f.write_bytes(data)
        first: list[int] = []
        meta = await push_file(peer, f, "k", "1", progress=lambda done, total: first.append(done), timeout=T)
        assert first[0] == have[-1] and meta["digest"] == digest
    finally:
        await peer.close()
    assert d.stop() == 0  # SIGTERM: a clean, graceful stop
