"""One version order for every place that picks a version, and the newest live version is
what serves: a push/rm/push sequence against real daemons (store + bootstrap, worker,
gateway, each its own process) is served correctly within 5 s of each change."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from swarmd.versions import latest, next_version, sort_versions, version_key
from swarmd_rpc import SyncClient
from tests.conftest import Daemon, http_json, rpc_call, run_cli, swarmd_env
from tests.gateway_fixtures import reference, tiny_mlp
from tests.swarm_daemons import start_gateway, start_hub, start_worker

BOUND = 5.0  # seconds the issue allows between a push or rm and what serves


def test_version_order() -> None:
    order = ["exp", "stable", "0.9", "v1.0-alpha", "1.0-beta", "1.0-beta.2", "1.0-rc1", "1", "1.0.1", "v1.1",
             "2-rc", "2", "2.9", "2.10", "10"]
    assert sort_versions(reversed(order)) == order
    assert latest(["1", "v1.0-beta"]) == "1"  # a pre-release never outranks its release
    assert latest(["2", "10", "9"]) == "10"  # numbers compare as numbers
    assert latest([]) is None
    assert next_version(["1", "v3.1-beta", "stable"]) == "4" and next_version([]) == "1"
    assert version_key("1") != version_key("1.0")  # equal rank, still a total order by text


def _post_json(port: int, key: str, path: str, doc: dict[str, Any]) -> tuple[int, Any]:
    return http_json(port, key, "POST", path, doc)


def _get(port: int, key: str, path: str) -> tuple[int, Any]:
    return http_json(port, key, "GET", path)


async def _health(ready: dict[str, Any], identity: Any = None) -> list[str]:
    return (await rpc_call(identity, ready, "getHealth", {}))["models"]


@pytest.mark.slow
def test_push_rm_push_serves_newest_within_bound(tmp_path: Path, daemons: Any, request: Any) -> None:
    env = swarmd_env(SWARMD_GATEWAY_ACCESS_LOG="false")
    store, boot = start_hub(daemons, tmp_path / "s", "bootstrap,store", env=env)
    _, wready = start_worker(daemons, tmp_path / "w", boot, env=env)
    _, port, key = start_gateway(daemons, tmp_path / "g", boot, env=env)
    blobs = {i: tiny_mlp(seed=100 + i) for i in range(1, 5)}
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)

    def push(i: int, *extra: str) -> str:
        f = tmp_path / f"m{i}.onnx"
        f.write_bytes(blobs[i])
        res = run_cli("model", "push", str(f), "--name", "iris", "--data-dir", str(tmp_path / "s"), *extra)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()[0]

    def blob_of(y: np.ndarray) -> int:
        which = [i for i, b in blobs.items() if np.allclose(y, reference(b, x)[0], rtol=1e-5, atol=1e-6)]
        assert len(which) == 1
        return which[0]

    def served() -> tuple[str, int]:
        """(version, which blob) an unversioned OIP request is answered with."""
        status, doc = _post_json(port, key, "/v2/models/iris/infer", {"inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert status == 200, doc
        y = np.asarray(next(o for o in doc["outputs"] if o["name"] == "y")["data"], np.float32).reshape(2, 3)
        return doc["model_version"], blob_of(y)

    def served_to_client() -> tuple[str, int]:
        """The same through swarmd_rpc (its own Fleet and Router, as `swarmd infer` uses), one
        long-lived client: nothing it learned earlier may keep an old version serving."""
        res = client.infer_detailed("iris", {"x": x}, timeout=30)
        return res.version, blob_of(res.outputs["y"])

    def both_serve(want: tuple[str, int], what: str) -> None:
        within(BOUND, served, want, f"{what} (gateway)")
        within(BOUND, served_to_client, want, f"{what} (swarmd_rpc client)")

    def within(bound: float, get: Any, want: Any, what: str) -> None:
        start = time.monotonic()
        while (got := get()) != want:
            assert time.monotonic() - start <= bound, f"{what}: {got!r}, not {want!r}, {bound} s after the change"
            time.sleep(0.1)

    def versions() -> list[str]:
        status, doc = _get(port, key, "/v2/models/iris")
        assert status == 200, doc
        return doc["versions"]

    assert push(1) == "iris:1"
    start = time.monotonic()
    while True:  # the first request waits for the swarm to converge; no bound on that
        try:
            assert served() == ("1", 1)
            break
        except AssertionError:
            assert time.monotonic() - start < 90, "iris:1 never served"
            time.sleep(0.2)

    client = SyncClient(bootstrap=[boot])
    request.addfinalizer(client.close)
    assert served_to_client() == ("1", 1)

    assert push(2) == "iris:2"
    both_serve(("2", 2), "iris:2 serving")

    res = run_cli("model", "rm", "iris:2", "--data-dir", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    both_serve(("1", 1), "iris:1 serving again after rm iris:2")
    within(BOUND, lambda: "iris:2" in asyncio.run(_health(wready)), False, "iris:2 unloaded from the worker")
    within(BOUND, versions, ["1"], "iris:2 gone from metadata")

    assert push(3) == "iris:3"  # a deleted number is never reused
    both_serve(("3", 3), "iris:3 serving")

    assert push(4, "--version", "v1.0-beta") == "iris:v1.0-beta"
    within(BOUND, versions, ["v1.0-beta", "1", "3"], "the beta listed")
    meta = _get(port, key, "/v2/models/iris")[1]
    assert meta["versions"][-1] == "3"
    show = run_cli("model", "show", "iris", "--data-dir", str(tmp_path / "s"))
    assert show.returncode == 0 and json.loads(show.stdout)["version"] == "3", show.stderr
    for _ in range(5):
        assert served() == ("3", 3)  # a pre-release pushed later is not the latest
        assert served_to_client() == ("3", 3)
    xfile = tmp_path / "x.json"
    xfile.write_text(json.dumps({"x": x.tolist()}))
    cli = run_cli("infer", "iris", "--input", str(xfile), "--json", "--bootstrap", boot)
    assert cli.returncode == 0 and json.loads(cli.stdout)["version"] == "3", cli.stderr
    ls = run_cli("model", "ls", "--json", "--data-dir", str(tmp_path / "s"))
    assert [m["version"] for m in json.loads(ls.stdout)] == ["v1.0-beta", "1", "3"]

    # the same bytes again without --version: the version that holds them, as --help says
    assert push(3) == "iris:3"
    # an explicit request for the beta serves it, and does not change what unversioned requests get
    status, doc = _post_json(port, key, "/v2/models/iris/versions/v1.0-beta/infer", {"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 200 and doc["model_version"] == "v1.0-beta", doc
    for _ in range(5):
        assert served() == ("3", 3)

    # a model that does not exist is 404 from every surface, naming no internal topic
    res = run_cli("model", "show", "nosuch", "--bootstrap", boot)
    assert res.returncode != 0 and "ERR_NOT_FOUND" in res.stderr and "swarmd/" not in res.stderr, res.stderr
    status, doc = _post_json(port, key, "/v2/models/nosuch/infer", {"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 404 and doc["code"] == "ERR_NOT_FOUND" and "swarmd/" not in doc["error"], doc

    # with the store gone, an existing model is "unavailable" (503), never "not found" (404)
    store.stop()
    deadline = time.monotonic() + 60
    while True:
        status, doc = _post_json(port, key, "/api/v1/inference/iris", {"inputs": {"x": x.tolist()}})
        assert status in (200, 503), doc  # the worker may serve what it has until the gateway notices
        if status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 503 and doc["code"] == "ERR_UNAVAILABLE" and "swarmd/" not in doc["error"], doc


_call = rpc_call


@pytest.mark.slow
async def test_read_only_calls_cannot_evict_the_operators_model_or_pick_the_default(
    tmp_path: Path, daemons: Any
) -> None:
    from swarmd.errors import ERR_OVERLOADED, SwarmdError
    from swarmd.node.identity import Identity

    operator, reader = Identity.generate(), Identity.generate()
    store: Daemon = daemons("--role", "bootstrap,store", "--data-dir", str(tmp_path / "s"))
    sready = await asyncio.to_thread(store.wait_event, "ready")
    boot = f"127.0.0.1:{sready['ports']['dht']}"
    for name, seed, version in (("op", 1, "1"), ("op", 2, "2"), ("opb", 3, "1"), ("r1", 4, "1"), ("r2", 5, "1"),
                                ("r3", 6, "1")):
        f = tmp_path / f"{name}{seed}.onnx"
        f.write_bytes(tiny_mlp(seed=seed))
        res = await asyncio.to_thread(run_cli, "model", "push", str(f), "--name", name, "--version", version,
                                      "--data-dir", str(tmp_path / "s"))
        assert res.returncode == 0, res.stderr
    env = swarmd_env(SWARMD_WORKER_MAX_MODELS="2",
                     SWARMD_ACCESS_ALLOW=f"{operator.public_hex},{sready['public_key']}",
                     SWARMD_ACCESS_ALLOW_READ_ONLY=reader.public_hex)
    worker = daemons("--role", "worker", "--data-dir", str(tmp_path / "w"), "--bootstrap", boot, env=env)
    w = await asyncio.to_thread(worker.wait_event, "ready")
    x = {"x": np.zeros((1, 4), np.float32)}

    async def infer(who: Any, model: str, version: str | None = None) -> str:
        params = {"model": model, "inputs": x, **({"version": version} if version else {})}
        for _ in range(300):  # the worker finds the store's announcements on its own schedule
            try:
                return (await _call(who, w, "runInference", params))["version"]
            except SwarmdError as e:
                if e.code not in ("ERR_NOT_FOUND", "ERR_UNAVAILABLE", "ERR_NOT_READY"):
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError(f"{model} never served")

    assert await infer(operator, "op") == "2"
    assert (await _call(operator, w, "loadModel", {"model": "op"}))["version"] == "2"  # pinned by the operator
    assert await infer(reader, "op", "1") == "1"  # an old version, asked for by a reader...
    assert await infer(reader, "op") == "2"  # ...does not become the default
    for name in ("r1", "r2", "r3", "r1"):  # more models than fit: least recently used ones go
        assert await infer(reader, name) == "1"
        assert "op:2" in await _health(w, reader)
    assert (await _call(operator, w, "loadModel", {"model": "opb"}))["version"] == "1"
    with pytest.raises(SwarmdError) as info:
        await _call(reader, w, "runInference", {"model": "r2", "inputs": x})
    assert info.value.code == ERR_OVERLOADED  # both places are pinned by the operator
    assert sorted(await _health(w, reader)) == ["op:2", "opb:1"]
    assert await infer(operator, "op") == "2"
