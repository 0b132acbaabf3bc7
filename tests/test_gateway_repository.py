"""Triton's model repository (index, load, unload) with the stock tritonclient.http and
tritonclient.grpc: a standalone gateway (its models dir is the repository) and a swarm (the
stores' catalog, the workers' memory) as separate processes; and every call either client
offers is served or answers 501 / UNIMPLEMENTED naming the feature."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from swarmd.gateway.config import GatewayConfig
from tests.conftest import rpc_call, run_cli, swarmd_env
from tests.gateway_fixtures import GatewayThread, install_model, tiny_mlp

MODEL = tiny_mlp(seed=8)
X = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data = tmp_path_factory.mktemp("gwrepo")
    install_model(data / "models", "mlp", "1", MODEL)
    install_model(data / "models", "other", "1", tiny_mlp(seed=9))
    g = GatewayThread(data, GatewayConfig())
    g.grpc_port = g.call(g.gateway.start_grpc("127.0.0.1", 0))
    yield g
    g.close()


def _http_infer(client: th.InferenceServerClient, model: str, h: dict[str, str]) -> np.ndarray:
    inp = th.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer(model, [inp], headers=h).as_numpy("y")


def test_standalone_load_unload_index_over_http(gw) -> None:
    client = th.InferenceServerClient(gw.url)
    h = {"x-api-key": gw.key("models:write", "infer", "models:read")}
    try:
        assert {"name": "other", "version": "1", "state": "READY"} in client.get_model_repository_index(headers=h)
        client.unload_model("other", headers=h)
        index = client.get_model_repository_index(headers=h)
        assert {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        assert not client.is_model_ready("other", headers=h)
        with pytest.raises(InferenceServerException) as e:
            _http_infer(client, "other", h)
        assert e.value.status() == "404"
        client.load_model("other", headers=h)
        assert client.is_model_ready("other", headers=h) and _http_infer(client, "other", h).shape == (1, 3)
        with pytest.raises(InferenceServerException) as e:
            client.load_model("nosuch", headers=h)
        assert e.value.status() == "404" and "nosuch" in str(e.value)
        with pytest.raises(InferenceServerException) as e:  # Triton's config override: no equivalent
            client.load_model("other", headers=h, config='{"backend": "onnxruntime"}')
        assert e.value.status() == "501" and "config" in str(e.value) and "swarmd model push" in str(e.value)
        # the permission of the other write routes: a read key may not load
        with pytest.raises(InferenceServerException) as e:
            client.load_model("other", headers={"x-api-key": gw.key("models:read")})
        assert e.value.status() == "403" and "models:write" in str(e.value)
    finally:
        client.close()


def test_standalone_load_unload_index_over_grpc(gw) -> None:
    client = tg.InferenceServerClient(f"127.0.0.1:{gw.grpc_port}")
    h = {"x-api-key": gw.key("models:write", "models:read")}
    try:
        client.unload_model("other", headers=h)
        rows = client.get_model_repository_index(headers=h, as_json=True)["models"]
        assert {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in rows
        assert all(r["state"] == "READY" for r in client.get_model_repository_index(headers=h, as_json=True)[
            "models"] if r["name"] == "mlp")
        client.load_model("other", headers=h)
        assert client.is_model_ready("other", headers=h)
        with pytest.raises(InferenceServerException) as e:
            client.load_model("other", headers={"x-api-key": gw.key("infer")})
        assert str(e.value.status()) == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as e:
            client.load_model("other", headers=h, files={"file:1/model.onnx": b"x"})
        assert str(e.value.status()) == "StatusCode.UNIMPLEMENTED" and "file:1/model.onnx" in str(e.value)
    finally:
        client.close()


def test_triton_routes_swarmd_lacks_answer_501_naming_the_feature(gw) -> None:
    client = th.InferenceServerClient(gw.url)
    h = {"x-api-key": gw.admin_key}
    calls = {
        "get_trace_settings": (lambda: client.get_trace_settings(headers=h), "[tracing]"),
        "update_trace_settings": (lambda: client.update_trace_settings("mlp", {"trace_rate": "1"}, headers=h),
                                  "trace settings"),
        "get_log_settings": (lambda: client.get_log_settings(headers=h), "log settings"),
        "update_log_settings": (lambda: client.update_log_settings({"log_info": True}, headers=h), "log settings"),
        "get_system_shared_memory_status": (lambda: client.get_system_shared_memory_status(headers=h),
                                            "system shared memory"),
        "register_system_shared_memory": (lambda: client.register_system_shared_memory("r", "/k", 64, headers=h),
                                          "system shared memory"),
        "unregister_system_shared_memory": (lambda: client.unregister_system_shared_memory(headers=h),
                                            "system shared memory"),
        "get_cuda_shared_memory_status": (lambda: client.get_cuda_shared_memory_status("r", headers=h),
                                          "CUDA shared memory"),
        "register_cuda_shared_memory": (lambda: client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 64, headers=h),
                                        "CUDA shared memory"),
        "unregister_cuda_shared_memory": (lambda: client.unregister_cuda_shared_memory("r", headers=h),
                                          "CUDA shared memory"),
    }
    try:
        for name, (call, feature) in calls.items():
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "501" and feature in str(e.value), (name, str(e.value))
        assert client.is_server_live()
    finally:
        client.close()


# Every public method of the stock clients, and the test that runs it against swarmd. A new
# tritonclient release that adds a call fails here until the call is mapped or refused.
HTTP_CALLS = {
    "is_server_live": "test_gateway_oip", "is_server_ready": "test_gateway_oip",
    "is_model_ready": "test_gateway_repository", "get_server_metadata": "test_gateway_oip",
    "get_model_metadata": "test_gateway_oip", "get_model_config": "test_gateway_oip",
    "get_model_repository_index": "test_gateway_repository", "load_model": "test_gateway_repository",
    "unload_model": "test_gateway_repository", "get_inference_statistics": "test_metrics_stats",
    "infer": "test_gateway_oip", "async_infer": "test_gateway_oip",
    "get_trace_settings": "501", "update_trace_settings": "501", "get_log_settings": "501",
    "update_log_settings": "501", "get_system_shared_memory_status": "501", "register_system_shared_memory": "501",
    "unregister_system_shared_memory": "501", "get_cuda_shared_memory_status": "501",
    "register_cuda_shared_memory": "501", "unregister_cuda_shared_memory": "501",
    # client-side helpers, no call to the server
    "close": "-", "generate_request_body": "-", "parse_response_body": "-",
    "plugin": "-", "register_plugin": "-", "unregister_plugin": "-",  # client-side header plugins
}
GRPC_CALLS = {
    "is_server_live": "test_gateway_grpc", "is_server_ready": "test_gateway_grpc",
    "is_model_ready": "test_gateway_grpc", "get_server_metadata": "test_gateway_grpc",
    "get_model_metadata": "test_gateway_grpc", "get_model_config": "test_gateway_grpc",
    "get_model_repository_index": "test_gateway_repository", "load_model": "test_gateway_repository",
    "unload_model": "test_gateway_repository", "get_inference_statistics": "test_metrics_stats",
    "infer": "test_gateway_grpc", "async_infer": "test_gateway_grpc", "start_stream": "test_gateway_grpc",
    "async_stream_infer": "test_gateway_grpc", "stop_stream": "test_gateway_grpc",
    "get_trace_settings": "UNIMPLEMENTED", "update_trace_settings": "UNIMPLEMENTED",
    "get_log_settings": "UNIMPLEMENTED", "update_log_settings": "UNIMPLEMENTED",
    "get_system_shared_memory_status": "UNIMPLEMENTED", "register_system_shared_memory": "UNIMPLEMENTED",
    "unregister_system_shared_memory": "UNIMPLEMENTED", "get_cuda_shared_memory_status": "UNIMPLEMENTED",
    "register_cuda_shared_memory": "UNIMPLEMENTED", "unregister_cuda_shared_memory": "UNIMPLEMENTED",
    "close": "-", "plugin": "-", "register_plugin": "-", "unregister_plugin": "-",
}


@pytest.mark.parametrize(("cls", "table"), [(th.InferenceServerClient, HTTP_CALLS),
                                              (tg.InferenceServerClient, GRPC_CALLS)])
def test_every_client_call_is_mapped(cls, table) -> None:
    public = {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}
    public -= {"get_result", "wrapped_post", "wrapped_callback"}  # internals of the client's own plumbing
    assert public == set(table), (sorted(public - set(table)), sorted(set(table) - public))
    import pathlib

    here = pathlib.Path(__file__).parent
    for name, where in table.items():
        if where.startswith("test_"):
            assert f"{name}(" in (here / f"{where}.py").read_text(), f"{name} is not called in {where}.py"


def test_grpc_unimplemented_calls_name_the_feature(gw) -> None:
    client = tg.InferenceServerClient(f"127.0.0.1:{gw.grpc_port}")
    h = {"x-api-key": gw.admin_key}
    calls = {
        "update_trace_settings": (lambda: client.update_trace_settings("mlp", {"trace_rate": "1"}, headers=h),
                                  "[tracing]"),
        "update_log_settings": (lambda: client.update_log_settings({"log_info": True}, headers=h), "log_level"),
        "register_system_shared_memory": (lambda: client.register_system_shared_memory("r", "/k", 64, headers=h),
                                          "shared memory"),
        "unregister_system_shared_memory": (lambda: client.unregister_system_shared_memory(headers=h),
                                            "shared memory"),
        "register_cuda_shared_memory": (lambda: client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 64, headers=h),
                                        "shared memory"),
        "unregister_cuda_shared_memory": (lambda: client.unregister_cuda_shared_memory(headers=h),
                                          "shared memory"),
    }
    try:
        for name, (call, feature) in calls.items():
            with pytest.raises(InferenceServerException) as e:
                call()
            assert str(e.value.status()) == "StatusCode.UNIMPLEMENTED" and feature in str(e.value), name
    finally:
        client.close()


def test_swarm_load_and_unload_reach_the_workers(daemons, tmp_path) -> None:
    """Gateway + store in one process, a worker in another: load makes the worker fetch and
    pin the model from the store, unload makes it drop it; both clients."""
    from tests.store_models import write_model

    g_dir = tmp_path / "g"
    g = daemons("--role", "bootstrap,store,gateway", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                "--data-dir", str(g_dir), env=swarmd_env(SWARMD_GATEWAY_ACCESS_LOG="false"))
    ports = g.wait_event("ready")["ports"]
    w = daemons("--role", "worker", "--bootstrap", f"127.0.0.1:{ports['dht']}", "--data-dir", str(tmp_path / "w"))
    w_ready = w.wait_event("ready")
    admin = next(line.rsplit(" ", 1)[-1].strip() for line in g.lines if "first admin API key (shown once" in line)
    r = run_cli("model", "push", str(write_model(tmp_path / "m.onnx", seed=5)), "--name", "lin", "--version", "1",
                "--data-dir", str(g_dir))
    assert r.returncode == 0, r.stderr
    h = {"x-api-key": admin}

    def loaded() -> list[str]:
        import asyncio

        ans = asyncio.run(rpc_call(None, w_ready, "getAvailableModels", {}))
        return sorted(m["name"] for m in ans["models"]) if isinstance(ans, dict) else sorted(
            m["name"] for m in ans)

    http = th.InferenceServerClient(f"127.0.0.1:{ports['http']}")
    grpc = tg.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    try:
        for _ in range(120):  # the gateway finds the worker and the catalog on its own schedule
            try:
                http.load_model("lin", headers=h)
                break
            except InferenceServerException:
                time.sleep(0.5)
        assert loaded() == ["lin"]
        assert {"name": "lin", "version": "1", "state": "READY"} in http.get_model_repository_index(headers=h)
        grpc.unload_model("lin", headers=h)
        assert loaded() == []
        grpc.load_model("lin", headers=h)
        assert loaded() == ["lin"]
        http.unload_model("lin", headers=h)
        assert loaded() == []
        with pytest.raises(InferenceServerException) as e:
            http.load_model("nosuch", headers=h)
        assert e.value.status() == "404"
        # the model stays in the catalog: a request loads it on a worker again
        inp = th.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(np.ones((2, 4), np.float32))
        assert http.infer("lin", [inp], headers=h).as_numpy("y").shape[0] == 2
    finally:
        http.close()
        grpc.close()
