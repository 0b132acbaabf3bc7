"""The stock tritonclient (HTTP) against a real gateway serving a real ONNX model."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.gateway_fixtures import GatewayThread, install_model, reference, tiny_mlp

MODEL = tiny_mlp(seed=1)
MODEL_V2 = tiny_mlp(seed=2)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data = tmp_path_factory.mktemp("gw")
    install_model(data / "models", "mlp", "1", MODEL)
    install_model(data / "models", "mlp", "2", MODEL_V2)
    g = GatewayThread(data)
    yield g
    g.close()


@pytest.fixture(scope="module")
def client(gw):
    c = triton.InferenceServerClient(gw.url, network_timeout=60.0)
    yield c
    c.close()


def hdr(gw):
    return {"x-api-key": gw.admin_key}


def test_health_needs_no_key(gw, client):
    assert client.is_server_live()
    assert client.is_server_ready()


def test_server_metadata_lists_binary_extension(gw, client):
    meta = client.get_server_metadata(headers=hdr(gw))
    assert "binary_tensor_data" in meta["extensions"]
    assert meta["name"] == "swarmd"


def test_model_metadata_and_versions(gw, client):
    meta = client.get_model_metadata("mlp", headers=hdr(gw))
    assert meta["name"] == "mlp"
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"y": "FP32", "label": "INT64"}
    assert client.get_model_metadata("mlp", "1", headers=hdr(gw))["name"] == "mlp"
    assert client.is_model_ready("mlp", headers=hdr(gw))
    assert client.is_model_ready("mlp", "2", headers=hdr(gw))
    assert not client.is_model_ready("nope", headers=hdr(gw))


def test_unknown_model_and_version_are_404_with_error(gw, client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope", headers=hdr(gw))
    assert "unknown model" in e.value.message()
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("mlp", "9", headers=hdr(gw))
    assert "unknown version" in e.value.message()


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_json_and_binary(gw, client, binary_in, binary_out):
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [triton.InferRequestedOutput("y", binary_data=binary_out),
            triton.InferRequestedOutput("label", binary_data=binary_out)]
    res = client.infer("mlp", [inp], outputs=outs, headers=hdr(gw), request_id="abc")
    want_y, want_label = reference(MODEL_V2, x)  # latest version is 2
    np.testing.assert_allclose(res.as_numpy("y"), want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.as_numpy("label"), want_label)
    r = res.get_response()
    assert r["model_name"] == "mlp" and r["model_version"] == "2" and r["id"] == "abc"


def test_infer_specific_version_and_default_outputs(gw, client):
    x = np.ones((1, 4), dtype=np.float32)
    inp = triton.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("mlp", [inp], model_version="1", headers=hdr(gw))
    np.testing.assert_allclose(res.as_numpy("y"), reference(MODEL, x)[0], rtol=1e-5, atol=1e-6)
    assert res.get_response()["model_version"] == "1"


def test_infer_errors_reach_the_client(gw, client):
    inp = triton.InferInput("x", [1, 4], "FP64")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float64))
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp], headers=hdr(gw))
    assert e.value.status() == "400" and "has dtype float64, expected float32" in e.value.message()
    inp = triton.InferInput("x", [1, 5], "FP32")
    inp.set_data_from_numpy(np.ones((1, 5), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp], headers=hdr(gw))
    assert "has shape [1, 5], expected [" in e.value.message()
    inp = triton.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [inp], headers=hdr(gw))
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp])
    assert e.value.status() == "401"


def test_infer_with_bearer_and_compressed_request(gw, client):
    x = np.full((2, 4), 0.5, dtype=np.float32)
    inp = triton.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = client.infer("mlp", [inp], headers={"Authorization": f"Bearer {gw.admin_key}"},
                       request_compression_algorithm="gzip")
    np.testing.assert_allclose(res.as_numpy("y"), reference(MODEL_V2, x)[0], rtol=1e-5, atol=1e-6)


def test_model_config_and_repository_index(gw, client):
    cfg = client.get_model_config("mlp", headers=hdr(gw))
    assert cfg["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}
    index = client.get_model_repository_index(headers=hdr(gw))
    assert {"name": "mlp", "version": "2", "state": "READY"} in index


def test_async_infer_requests_in_flight_together(gw):
    """tritonclient.http's async_infer: several requests in flight on its connection pool."""
    c = triton.InferenceServerClient(gw.url, concurrency=4, network_timeout=60.0)
    try:
        xs = [np.full((1, 4), i, dtype=np.float32) for i in range(6)]
        pending = []
        for x in xs:
            inp = triton.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            pending.append(c.async_infer("mlp", [inp], headers=hdr(gw), model_version="1"))
        for x, p in zip(xs, pending, strict=True):
            np.testing.assert_allclose(p.get_result().as_numpy("y"), reference(MODEL, x)[0], rtol=1e-5, atol=1e-6)
    finally:
        c.close()
