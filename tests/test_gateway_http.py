"""Gateway HTTP behaviour: permissions, rate limits, malformed input, CORS, ids, metrics, uploads, /api/v1."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import numpy as np
import pytest

from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.routes import PUBLIC
from swarmd.gateway.routes import ROUTES as TABLE
from tests.gateway_fixtures import GatewayThread, install_model, reference, tiny_mlp

MODEL = tiny_mlp(seed=5)
X = [[0.1, 0.2, 0.3, 0.4]]
INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data = tmp_path_factory.mktemp("gwhttp")
    install_model(data / "models", "mlp", "1", MODEL)
    g = GatewayThread(data, GatewayConfig(cors_origins=["https://app.example"]))
    yield g
    g.close()


# A concrete request for each route of the table (swarmd/gateway/routes.py) whose permission this
# checks; the table gives the method and the permission. Routes left out say why.
SAMPLES = {
    "/v2": ("/v2", None),
    "/v2/models/{model}": ("/v2/models/mlp", None),
    "/v2/models/{model}/versions/{version}": ("/v2/models/mlp/versions/1", None),
    "/v2/models/{model}/config": ("/v2/models/mlp/config", None),
    "/v2/models/{model}/versions/{version}/config": ("/v2/models/mlp/versions/1/config", None),
    "/v2/models/{model}/ready": ("/v2/models/mlp/ready", None),
    "/v2/models/{model}/versions/{version}/ready": ("/v2/models/mlp/versions/1/ready", None),
    "/v2/models/{model}/infer": ("/v2/models/mlp/infer", INFER),
    "/v2/models/{model}/versions/{version}/infer": ("/v2/models/mlp/versions/1/infer", INFER),
    "/v2/repository/index": ("/v2/repository/index", None),
    "/v2/repository/models/{model}/load": ("/v2/repository/models/mlp/load", {}),
    "/v2/models/stats": ("/v2/models/stats", None, 501),
    "/v2/models/{model}/stats": ("/v2/models/mlp/stats", None, 501),
    "/v2/models/{model}/versions/{version}/stats": ("/v2/models/mlp/versions/1/stats", None, 501),
    "/api/v1/inference/{model}": ("/api/v1/inference/mlp", {"input": X[0]}),
    "/api/v1/models": ("/api/v1/models", None),
    "/api/v1/models/{model}": ("/api/v1/models/mlp", None),
    "/api/v1/status": ("/api/v1/status", None),
    "/api/v1/keys": ("/api/v1/keys", None),
    "/metrics": ("/metrics", None),
}
NOT_SAMPLED = {  # (method, path): why the permission check is tested elsewhere or cannot answer 200
    ("POST", "/v2/repository/models/{model}/unload"): "unloads the model the other tests use: "
                                                       "test_gateway_repository.py",
    ("POST", "/api/v1/models"): "an upload: test_upload_* with a models:write key",
    ("POST", "/api/v1/keys"): "creates keys: test_gateway_keys.py",
    ("GET", "/api/v1/keys/{id}"): "needs a key id: test_gateway_keys.py",
    ("DELETE", "/api/v1/keys/{id}"): "revokes: test_gateway_keys.py",
    ("GET", "/api/v1/dashboard/feed"): "a Server-Sent Events stream: test_gateway_dashboard.py",
}
# (method, path, body, permission, the status a key with the permission gets: 501 where LocalBackend
# has no such thing)
ROUTES = [(r.method, *SAMPLES[r.path][:2], r.permission, (*SAMPLES[r.path], 200)[2]) for r in TABLE
          if r.permission != PUBLIC and (r.method, r.path) not in NOT_SAMPLED]


def test_every_route_of_the_table_is_sampled_served_and_documented(gw):
    from swarmd import __version__
    from swarmd.gateway.openapi import openapi_document

    doc = openapi_document(__version__)["paths"]
    for r in TABLE:
        assert (r.method, r.path) in NOT_SAMPLED or r.permission == PUBLIC or r.path in SAMPLES, r
        op = doc[r.path][r.method.lower()]
        assert op.get("x-permission", PUBLIC) == r.permission and op["summary"] == r.summary
    served = {(res.canonical, route.method) for res in gw.gateway.app.router.resources() for route in res}
    assert {(r.path, r.method) for r in TABLE} <= served
    assert {(p, m) for p, m in served if m != "HEAD"} == {(r.path, r.method) for r in TABLE}


@pytest.mark.parametrize(("method", "path", "body", "perm", "ok"), ROUTES)
def test_every_route_checks_its_permission(gw, method, path, body, perm, ok):
    assert gw.request(method, path, body).status == 401
    bad = gw.request(method, path, body, key="swd_000000000000_" + "A" * 43)
    assert bad.status == 401 and bad.json()["code"] == "ERR_UNAUTHORIZED"
    either = perm.split("|")  # metadata and readiness: models:read, or infer (Triton reads them before inferring)
    others = [p for p in ("infer", "models:read", "models:write") if p not in either]
    r = gw.request(method, path, body, key=gw.key(*others))
    assert r.status == 403, r.body
    assert all(p in r.json()["error"] for p in either)
    for p in either:
        assert gw.request(method, path, body, key=gw.key(p)).status == ok, p
    assert gw.request(method, path, body, key=gw.key("admin")).status == ok


@pytest.mark.parametrize(("method", "path", "feature"), [
    ("GET", "/v2/trace/setting", "trace settings"),
    ("POST", "/v2/models/mlp/trace/setting", "trace settings"),
    ("GET", "/v2/logging", "log settings"),
    ("GET", "/v2/systemsharedmemory/region/r/status", "system shared memory"),
    ("POST", "/v2/systemsharedmemory/unregister", "system shared memory"),
    ("POST", "/v2/cudasharedmemory/region/r/register", "CUDA shared memory"),
])
def test_triton_extensions_not_served_answer_501_naming_the_feature(gw, method, path, feature):
    r = gw.request(method, path, {} if method == "POST" else None, key=gw.key("admin"))
    assert r.status == 501 and r.json()["code"] == "ERR_NOT_IMPLEMENTED" and feature in r.json()["error"], r.body


def test_upload_needs_models_write(gw):
    body = {"name": "up0", "data": base64.b64encode(MODEL).decode()}
    assert gw.request("POST", "/api/v1/models", body, key=gw.key("infer", "models:read")).status == 403
    r = gw.request("POST", "/api/v1/models", body, key=gw.key("models:write"))
    assert r.status == 201, r.body
    assert r.json()["version"] == "1" and r.json()["digest"] == hashlib.sha256(MODEL).hexdigest()


def test_public_routes(gw):
    for path in ("/health", "/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs"):
        assert gw.request("GET", path).status == 200, path
    doc = gw.request("GET", "/openapi.json").json()
    assert doc["paths"]["/v2/models/{model}/infer"]["post"]["x-permission"] == "infer"
    assert b"/api/v1/keys" in gw.request("GET", "/docs").body


def test_bearer_header_and_malformed_authorization(gw):
    key = gw.key("models:read")
    assert gw.request("GET", "/v2/models/mlp", headers={"Authorization": f"Bearer {key}"}).status == 200
    r = gw.request("GET", "/v2/models/mlp", headers={"Authorization": f"Basic {key}"})
    assert r.status == 401 and "Bearer" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_rate_limit_429_with_retry_after_and_usage(gw):
    key = gw.key("models:read", rate_rps=0.01, rate_burst=3)
    statuses = [gw.request("GET", "/v2/models/mlp", key=key).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    r = gw.request("GET", "/v2/models/mlp", key=key)
    assert r.json()["code"] == "ERR_RATE_LIMITED"
    assert int(r.headers["retry-after"]) >= 1
    # another key is not affected
    assert gw.request("GET", "/v2/models/mlp", key=gw.key("models:read")).status == 200
    key_id = key.split("_")[1]
    usage = gw.request("GET", f"/api/v1/keys/{key_id}", key=gw.admin_key).json()
    assert usage["requests"] == 3 and usage["denied"] == 3


def test_keys_admin_routes_create_list_revoke(gw):
    r = gw.request("POST", "/api/v1/keys", {"name": "ci", "permissions": ["infer"]}, key=gw.admin_key)
    assert r.status == 201
    created = r.json()
    token = created["key"]
    assert token.startswith("swd_") and created["permissions"] == ["infer"]
    listing = gw.request("GET", "/api/v1/keys", key=gw.admin_key).json()["keys"]
    entry = next(k for k in listing if k["id"] == created["id"])
    assert token not in json.dumps(listing) and entry["key"].endswith("********")
    assert gw.request("POST", "/v2/models/mlp/infer", INFER, key=token).status == 200
    assert gw.request("DELETE", f"/api/v1/keys/{created['id']}", key=gw.admin_key).status == 200
    assert gw.request("POST", "/v2/models/mlp/infer", INFER, key=token).status == 401
    assert gw.request("DELETE", "/api/v1/keys/ffffffffffff", key=gw.admin_key).status == 404
    bad = gw.request("POST", "/api/v1/keys", {"name": "x", "permissions": ["root"]}, key=gw.admin_key)
    assert bad.status == 400 and "unknown permission 'root'" in bad.json()["error"]


MALFORMED = [
    (b"not json", None, "malformed"),
    (b"[1,2]", None, "JSON object"),
    (b"{}", None, "inputs must be a non-empty list"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}).encode(), None, "no data"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP99", "data": X}]}).encode(), None,
     "'FP99' is not supported"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": X}]}).encode(), None,
     "needs 5"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, -4], "datatype": "FP32", "data": X}]}).encode(), None,
     "non-negative"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [["a"] * 4]}]}).encode(),
     None, "not a list of FP32"),
    (json.dumps({"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": X}]}).encode(), None,
     "has no input 'y'"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}],
                 "outputs": [{"name": "zz"}]}).encode(), None, "has no output 'zz'"),
    (json.dumps(INFER).encode() + b"\0" * 5, "auto", "5 binary bytes that no input"),
    (b"{}", "99", "Inference-Header-Content-Length is 99"),
    (b"{}", "abc", "decimal byte count"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                             "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 8, "auto",
     "only 8 binary bytes remain"),
]


@pytest.mark.parametrize(("body", "hlen", "needle"), MALFORMED)
def test_malformed_infer_bodies_are_precise_400(gw, body, hlen, needle):
    headers = {}
    if hlen == "auto":
        headers["Inference-Header-Content-Length"] = str(body.index(b"\0"))
    elif hlen is not None:
        headers["Inference-Header-Content-Length"] = hlen
    r = gw.request("POST", "/v2/models/mlp/infer", body, headers=headers, key=gw.admin_key)
    assert r.status == 400, r.body
    doc = r.json()
    assert doc["code"] == "ERR_BAD_REQUEST" and needle in doc["error"], doc


def test_binary_infer_by_hand_matches_reference(gw):
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    r = gw.request("POST", "/v2/models/mlp/infer", head + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head))}, key=gw.admin_key)
    assert r.status == 200
    hl = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.body[:hl])
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    assert sum(sizes) == len(r.body) - hl
    y = np.frombuffer(r.body[hl:hl + sizes[0]], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
    np.testing.assert_allclose(y, reference(MODEL, x)[0], rtol=1e-5, atol=1e-6)


def test_too_large_body_is_413(tmp_path):
    g = GatewayThread(tmp_path, GatewayConfig(max_body_bytes=1000))
    try:
        install_model(tmp_path / "models", "mlp", "1", MODEL)
        r = g.request("POST", "/v2/models/mlp/infer", b"{" + b" " * 2000 + b"}", key=g.admin_key)
        assert r.status == 413 and r.json()["code"] == "ERR_TOO_LARGE"
    finally:
        g.close()


def test_malformed_http_is_400_and_server_keeps_serving(gw):
    out = gw.raw(b"GARBAGE\r\n\r\n")
    assert out.split(b" ")[1] == b"400" and b"Invalid method" in out
    out = gw.raw(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    assert out.split(b" ")[1] == b"400" and b"Content-Length" in out
    out = gw.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n")
    assert out.split(b" ")[1] in (b"400", b"431")
    assert gw.request("GET", "/health").status == 200


def test_unknown_route_and_method_are_json(gw):
    r = gw.request("GET", "/nope")
    assert r.status == 404 and r.json()["code"] == "ERR_NOT_FOUND"
    r = gw.request("DELETE", "/v2/models/mlp/infer", key=gw.admin_key)
    assert r.status == 405 and "error" in r.json()


def test_request_id_echoed_or_generated(gw):
    r = gw.request("GET", "/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = gw.request("GET", "/health", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 16
    assert gw.request("GET", "/health").headers["x-request-id"] != r.headers["x-request-id"]
    r = gw.request("GET", "/v2/models/nope", key=gw.admin_key)
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_cors_allow_list(gw):
    ok = gw.request("OPTIONS", "/v2/models/mlp/infer",
                    headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert ok.status == 204
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in ok.headers["access-control-allow-headers"]
    no = gw.request("OPTIONS", "/v2/models/mlp/infer",
                    headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert no.status == 403 and "access-control-allow-origin" not in no.headers
    r = gw.request("GET", "/health", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = gw.request("GET", "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_metrics_exposition(gw):
    gw.request("POST", "/v2/models/mlp/infer", INFER, key=gw.admin_key)
    gw.request("GET", "/v2/models/unknown-model-name", key=gw.admin_key)
    text = gw.request("GET", "/metrics", key=gw.admin_key).body.decode()
    assert "# TYPE swarmd_gateway_request_duration_seconds histogram" in text
    assert 'route="/v2/models/{model}/infer",model="mlp",status="200",le="+Inf"' in text
    assert "swarmd_gateway_in_flight 1" in text  # the scrape itself
    assert "swarmd_gateway_workers 1" in text
    assert "unknown-model-name" not in text  # client-chosen names never become series
    gw.raw(b"PROPFIND /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # a method llhttp knows
    text = gw.request("GET", "/metrics", key=gw.admin_key).body.decode()
    assert "PROPFIND" not in text and 'method="OTHER"' in text


def test_v1_inference_and_models(gw):
    r = gw.request("POST", "/api/v1/inference/mlp", {"inputs": {"x": X}}, key=gw.admin_key)
    assert r.status == 200, r.body
    want = reference(MODEL, np.array(X, dtype=np.float32))
    np.testing.assert_allclose(r.json()["outputs"]["y"], want[0], rtol=1e-5, atol=1e-6)
    assert r.json()["outputs"]["label"] == want[1].tolist()
    r = gw.request("POST", "/api/v1/inference/mlp", {"input": "nope"}, key=gw.admin_key)
    assert r.status == 400 and "cannot be read as float32" in r.json()["error"]
    models = gw.request("GET", "/api/v1/models", key=gw.admin_key).json()["models"]
    assert "mlp" in [m["name"] for m in models]
    m = gw.request("GET", "/api/v1/models/mlp", key=gw.admin_key).json()
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]


def test_streamed_upload_then_infer(gw):
    model = tiny_mlp(seed=9)
    sha = hashlib.sha256(model).hexdigest()
    r = gw.request("POST", "/api/v1/models?name=streamed&version=7&tags=a,b", model,
                   headers={"Content-Type": "application/octet-stream", "X-Model-Sha256": sha}, key=gw.admin_key)
    assert r.status == 201, r.body
    assert r.json()["digest"] == sha and r.json()["tags"] == ["a", "b"]
    r = gw.request("POST", "/v2/models/streamed/versions/7/infer", INFER, key=gw.admin_key)
    assert r.status == 200
    # same version, other bytes: conflict
    r = gw.request("POST", "/api/v1/models?name=streamed&version=7", tiny_mlp(seed=10), key=gw.admin_key)
    assert r.status == 409
    r = gw.request("POST", "/api/v1/models?name=streamed&version=8&sha256=" + "0" * 64, model, key=gw.admin_key)
    assert r.status == 502 and "sha256" in r.json()["error"]


def test_multipart_upload_with_the_same_checks(gw, tmp_path):
    """`curl -F model=@m.onnx -F name=...`: what a person tries first works, checked like a raw body."""
    import shutil
    import subprocess

    curl = shutil.which("curl")
    assert curl is not None, "curl is part of the test image"
    model = tiny_mlp(seed=11)
    (tmp_path / "m.onnx").write_bytes(model)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    sha = hashlib.sha256(model).hexdigest()

    def post(*form: str, query: str = "") -> tuple[int, dict]:
        out = subprocess.run(
            [curl, "-s", "-o", "-", "-w", "\n%{http_code}", "-H", f"x-api-key: {gw.admin_key}",
             *[a for f in form for a in ("-F", f)], f"http://{gw.url}/api/v1/models{query}"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
        body, _, code = out.stdout.rpartition("\n")
        return int(code), json.loads(body)

    code, doc = post("model=@m.onnx", "name=multi", "tags=x,y", f"sha256={sha}")
    assert code == 201 and doc["digest"] == sha and doc["tags"] == ["x", "y"] and doc["version"] == "1", doc
    code, doc = post("model=@m.onnx", query="?name=multi&version=5")  # fields in the query work too
    assert code == 201 and doc["version"] == "5", doc
    assert gw.request("POST", "/v2/models/multi/versions/5/infer", INFER, key=gw.admin_key).status == 200
    code, doc = post("model=@junk.onnx", "name=junk")
    assert code == 400 and doc["code"] == "ERR_INVALID_MODEL", doc
    code, doc = post("model=@m.onnx", "name=multi", "sha256=" + "0" * 64)
    assert code == 502 and "sha256" in doc["error"], doc
    code, doc = post("name=nofile")
    assert code == 400 and "-F model=@FILE" in doc["error"], doc
    code, doc = post("model=@m.onnx")
    assert code == 400 and "name is required" in doc["error"], doc
    code, doc = post("model=@m.onnx", "name=multi", "colour=blue")
    assert code == 400 and "unexpected form field 'colour'" in doc["error"], doc
    code, doc = post("model=@m.onnx", "name=multi", "version=1", "description=" + "d" * 5000)
    assert code == 400 and "over 4096 bytes" in doc["error"], doc
    assert not list((gw.data_dir / "gateway" / "uploads").iterdir())  # no partial file left behind


def test_upload_rejects_garbage(gw):
    r = gw.request("POST", "/api/v1/models", {"name": "g", "data": "!!!"}, key=gw.admin_key)
    assert r.status == 400 and "base64" in r.json()["error"]
    r = gw.request("POST", "/api/v1/models",
                   {"name": "g", "data": base64.b64encode(b"not onnx").decode()}, key=gw.admin_key)
    assert r.status == 400 and r.json()["code"] == "ERR_INVALID_MODEL"
    r = gw.request("POST", "/api/v1/models?name=../etc", b"x", key=gw.admin_key)
    assert r.status == 400 and "model name" in r.json()["error"]
    r = gw.request("POST", "/api/v1/models", b"x", key=gw.admin_key)
    assert r.status == 400 and "name is required" in r.json()["error"]


def test_hostile_shapes_and_dtypes_allocate_nothing(gw):
    head = json.dumps({"inputs": [{"name": "s", "shape": [10**12], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    r = gw.request("POST", "/v2/models/mlp/infer", head + b"\0\0\0\0",
                   headers={"Inference-Header-Content-Length": str(len(head))}, key=gw.admin_key)
    assert r.status == 400 and "BYTES elements" in r.json()["error"]
    r = gw.request("POST", "/api/v1/inference/mlp", {"inputs": {"x": {"data": [1], "dtype": "V1000000000"}}},
                   key=gw.admin_key)
    assert r.status == 400 and "is not one of" in r.json()["error"]


def test_bytes_binary_input_is_parsed():
    from swarmd.gateway.oip import decode_infer_request

    head = json.dumps({"inputs": [{"name": "s", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4 + 2 + 4 + 3}}]}).encode()
    raw = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 3) + b"you"
    req = decode_infer_request(head + raw, len(head))
    assert req.inputs["s"].tolist() == [b"hi", b"you"]


def test_access_log_holds_every_request_in_batches(gw):
    """The access log is written in batches off the request path, but no request is left out."""
    with gw.access_entries() as entries:
        rids = [f"access-{i}" for i in range(5)]
        for rid in rids:
            assert gw.request("GET", "/v2/health/live", headers={"X-Request-Id": rid}).status == 200
        assert gw.request("GET", "/v2/models/mlp", key="swd_000000000000_" + "A" * 43,
                          headers={"X-Request-Id": "access-denied"}).status == 401
    assert len(entries) == 6
    assert [e["request_id"] for e in entries] == [*rids, "access-denied"]
    assert entries[0]["path"] == "/v2/health/live" and entries[0]["status"] == 200
    assert entries[-1]["status"] == 401 and entries[-1]["method"] == "GET"
    assert "grpc_status" not in entries[0]
