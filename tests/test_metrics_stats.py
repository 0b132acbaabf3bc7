"""Triton-shaped statistics and Prometheus metrics of real worker and store daemons."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import numpy as np
import pytest

from swarmd.errors import SwarmdError
from swarmd.node.eventloop import run, uvloop_available
from swarmd.rpc import connect
from swarmd.worker.config import WorkerConfig
from swarmd.worker.engine import InferenceEngine
from swarmd.worker.stats import ModelStats
from tests.conftest import run_cli, swarmd_env
from tests.models import mlp_model

MLP = (16, 32, 4)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_model_stats_in_tritons_shape() -> None:
    s = ModelStats()
    s.record_run(3, 5, (0.001, 0.002, 0.0005))
    for _ in range(3):
        s.record_request(True, 0.010, 0.004)
    s.record_request(False, 0.5, None)
    doc = s.to_triton("m", "1")
    assert doc["inference_count"] == 5 and doc["execution_count"] == 1 and doc["last_inference"] > 0
    st = doc["inference_stats"]
    assert st["success"] == {"count": 3, "ns": 30_000_000} and st["fail"] == {"count": 1, "ns": 500_000_000}
    assert st["queue"] == {"count": 3, "ns": 12_000_000}
    assert st["compute_infer"] == {"count": 3, "ns": 6_000_000}  # each request of the run counts it
    assert doc["batch_stats"] == [{"batch_size": 3, "compute_input": {"count": 1, "ns": 1_000_000},
                                   "compute_infer": {"count": 1, "ns": 2_000_000},
                                   "compute_output": {"count": 1, "ns": 500_000}}]
    for i in range(2 * ModelStats.MAX_BATCH_SIZES):  # batch sizes come from requests: bounded
        s.record_run(i + 1, i + 1, (0.0, 0.0, 0.0))
    assert len(s.to_triton("m", "1")["batch_stats"]) == ModelStats.MAX_BATCH_SIZES


async def test_engine_counts_requests_runs_and_failures() -> None:
    engine = InferenceEngine(WorkerConfig(max_concurrent_inferences=1))
    try:
        await engine.load("mlp", "1", mlp_model(MLP))
        x = np.ones((2, MLP[0]), np.float32)
        await asyncio.gather(*(engine.infer("mlp", {"input": x}) for _ in range(8)))
        with pytest.raises(SwarmdError):
            await engine.infer("mlp", {"input": np.ones((1, 3), np.float32)})  # refused before queueing
        (doc,) = engine.statistics("mlp")
        st = doc["inference_stats"]
        assert st["success"]["count"] == 8 and st["queue"]["count"] == 8 and st["compute_infer"]["count"] == 8
        assert doc["inference_count"] == 16 and 1 <= doc["execution_count"] <= 8
        assert sum(b["compute_infer"]["count"] for b in doc["batch_stats"]) == doc["execution_count"]
        assert st["success"]["ns"] >= st["compute_infer"]["ns"] > 0
        assert engine.statistics("other") == [] and engine.statistics("mlp", "2") == []
    finally:
        await engine.close()


async def test_worker_daemon_serves_statistics_and_triton_metrics(daemons, tmp_path) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_model(MLP))
    d = daemons("--role", "worker", "--metrics", "127.0.0.1:0", "--data-dir", str(tmp_path / "w"),
                env=swarmd_env(SWARMD_WORKER_MODELS=f"mlp={model}"))
    ready = await asyncio.to_thread(d.wait_event, "ready")
    port = ready["ports"]["metrics"]
    peer = await connect(None, "127.0.0.1", ready["ports"]["rpc"],
                         remote_public_key=bytes.fromhex(ready["public_key"]), timeout=30)
    try:
        x = np.ones((3, MLP[0]), np.float32)
        for _ in range(4):
            await peer.call("runInference", {"model": "mlp", "inputs": {"input": x}}, timeout=30)
        stats = await peer.call("getModelStatistics", {"model": "mlp"}, timeout=30)
        with pytest.raises(SwarmdError) as e:
            await peer.call("getModelStatistics", {"model": 5}, timeout=30)
        assert e.value.code == "ERR_BAD_REQUEST"
    finally:
        await peer.close()
    (doc,) = stats["model_stats"]
    assert doc["name"] == "mlp" and doc["version"] == "1" and doc["inference_count"] == 12
    m = await asyncio.to_thread(_scrape, port)
    assert m['nv_inference_request_success{model="mlp",version="1"}'] == 4
    assert m['nv_inference_count{model="mlp",version="1"}'] == 12
    assert m['nv_inference_exec_count{model="mlp",version="1"}'] == 4
    assert m['nv_inference_compute_infer_duration_us{model="mlp",version="1"}'] > 0
    assert m["swarmd_worker_queue_depth"] == 0 and m["swarmd_uptime_seconds"] > 0
    assert "swarmd_dht_records" in m
    assert d.stop() == 0


def test_store_metrics_and_a_taken_port(daemons, tmp_path) -> None:
    d = daemons("--role", "store", "--metrics", "127.0.0.1:0", "--data-dir", str(tmp_path / "s"))
    port = d.wait_event("ready")["ports"]["metrics"]
    m = _scrape(port)
    assert m["swarmd_store_bytes"] == 0 and m["swarmd_store_models"] == 0
    r = run_cli("--role", "bootstrap", "--metrics", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "b"))
    assert r.returncode == 1 and f"metrics cannot listen on 127.0.0.1:{port}" in r.stderr
    assert d.stop() == 0


def test_gateway_statistics_over_http_and_grpc_sum_the_workers(daemons, tmp_path) -> None:
    import json

    import tritonclient.grpc as tg
    import tritonclient.http as th

    from tests.store_models import write_model

    g_dir = tmp_path / "g"
    g = daemons("--role", "bootstrap,store,orchestrator,gateway", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                "--data-dir", str(g_dir))
    ports = g.wait_event("ready")["ports"]
    boot = f"127.0.0.1:{ports['dht']}"
    w = daemons("--role", "worker", "--bootstrap", boot, "--data-dir", str(tmp_path / "w"))
    w.wait_event("ready")
    admin = next(line.rsplit(" ", 1)[-1].strip() for line in g.lines if "first admin API key (shown once" in line)
    r = run_cli("model", "push", str(write_model(tmp_path / "m.onnx", seed=5)), "--name", "lin", "--version", "1",
                "--data-dir", str(g_dir))
    assert r.returncode == 0, r.stderr
    h = {"x-api-key": admin}  # tritonclient.http adds its own headers to this dict
    http = th.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    x = np.ones((2, 4), np.float32)
    inp = th.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    deadline = 60
    while True:  # the first requests may find the worker still discovering the model
        try:
            http.infer("lin", [inp], headers=h)
            break
        except Exception:
            deadline -= 1
            assert deadline > 0
            import time

            time.sleep(1)
    for _ in range(2):
        http.infer("lin", [inp], headers=h)
    stats = http.get_inference_statistics("lin", headers=h)
    (doc,) = stats["model_stats"]
    assert doc["name"] == "lin" and doc["version"] == "1" and doc["inference_count"] >= 6
    assert doc["inference_stats"]["success"]["count"] >= 3
    grpc = tg.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    try:
        gs = grpc.get_inference_statistics("lin", headers={"x-api-key": admin}, as_json=True)
        assert gs["model_stats"][0]["name"] == "lin" and int(gs["model_stats"][0]["inference_count"]) >= 6
    finally:
        grpc.close()
    everything = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{ports['http']}/v2/models/stats", headers={"x-api-key": admin}), timeout=10).read())
    assert [d["name"] for d in everything["model_stats"]] == ["lin"]
    try:
        http.get_inference_statistics("nosuch", headers=h)
        raise AssertionError("an unknown model's statistics must be a 404")
    except th.InferenceServerException as e:
        assert "ERR_NOT_FOUND" in str(e) or "404" in str(e.status())
    http.close()


@pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed (optional off Linux)")
def test_statistics_keep_their_resolution_on_uvloop() -> None:
    """uvloop's loop.time() moves once per loop turn in whole milliseconds: durations taken on it
    made every request's total equal to its queue time, in whole ms. The worker's clock is its own."""

    async def go() -> tuple[str, dict[str, Any]]:
        engine = InferenceEngine(WorkerConfig(max_concurrent_inferences=1))
        try:
            await engine.load("mlp", "1", mlp_model(MLP))
            x = np.ones((2, MLP[0]), np.float32)
            await asyncio.gather(*(engine.infer("mlp", {"input": x}) for _ in range(8)))
            (doc,) = engine.statistics("mlp")
            return type(asyncio.get_running_loop()).__module__, doc["inference_stats"]
        finally:
            await engine.close()

    module, st = run(go(), "uvloop")
    assert module.startswith("uvloop")
    assert st["success"]["ns"] > st["queue"]["ns"]  # each request's total includes its run
    assert st["queue"]["ns"] % 1_000_000 != 0 or st["success"]["ns"] % 1_000_000 != 0
