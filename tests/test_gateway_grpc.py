"""The gateway's OIP v2 gRPC front with the stock tritonclient.grpc: every call the client
offers answers (or answers UNIMPLEMENTED naming the feature), with the HTTP front's keys,
permissions and error vocabulary."""

from __future__ import annotations

import asyncio
import functools
import queue
import socket

import numpy as np
import pytest
import tritonclient.grpc as tg
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.deadlines import Deadlines
from swarmd.gateway.grpc_service import decode_request, encode_response
from swarmd.gateway.oip import OipError
from swarmd.gateway.proto import oip_pb2 as pb
from tests.gateway_fixtures import GatewayThread, install_model, reference, tiny_mlp

MODEL = tiny_mlp(seed=4)
X = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]], dtype=np.float32)


@pytest.fixture(scope="module", params=["lean", "grpcio"])
def gw(request, tmp_path_factory):
    """A gateway with its gRPC front on each engine (gateway.grpc_engine): every test runs on both."""
    data = tmp_path_factory.mktemp("gwgrpc")
    install_model(data / "models", "mlp", "1", MODEL)
    g = GatewayThread(data, GatewayConfig(grpc_engine=request.param))
    g.grpc_port = g.call(g.gateway.start_grpc("127.0.0.1", 0))
    yield g
    g.close()


@pytest.fixture
def client(gw):
    c = tg.InferenceServerClient(url=f"127.0.0.1:{gw.grpc_port}")
    yield c
    c.close()


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_health_metadata_config_index(gw, client) -> None:
    h = {"x-api-key": gw.key("models:read")}
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(headers=h)
    assert meta.name == "swarmd" and "binary_tensor_data" in meta.extensions
    assert client.is_model_ready("mlp", headers=h) and client.is_model_ready("mlp", "1", headers=h)
    m = client.get_model_metadata("mlp", headers=h, as_json=True)
    assert m["name"] == "mlp" and m["versions"] == ["1"]
    assert [i["name"] for i in m["inputs"]] == ["x"] and m["inputs"][0]["datatype"] == "FP32"
    assert m["inputs"][0]["shape"] == ["-1", "4"]
    cfg = client.get_model_config("mlp", headers=h, as_json=True)["config"]
    assert cfg["name"] == "mlp" and cfg["backend"] == "onnxruntime"
    assert cfg["input"][0]["data_type"] == "TYPE_FP32" and cfg["output"][1]["data_type"] == "TYPE_INT64"
    index = client.get_model_repository_index(headers=h, as_json=True)
    assert index["models"] == [{"name": "mlp", "version": "1", "state": "READY"}]


def test_infer_raw_and_typed_contents_match_onnxruntime(gw, client) -> None:
    h = {"x-api-key": gw.key("infer")}
    want = reference(MODEL, X)
    inp = tg.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    r = client.infer("mlp", [inp], headers=h, request_id="r1")
    np.testing.assert_allclose(r.as_numpy("y"), want[0], rtol=1e-6)
    np.testing.assert_array_equal(r.as_numpy("label"), want[1])
    assert r.get_response().id == "r1" and r.get_response().model_version == "1"
    only = client.infer("mlp", [inp], outputs=[tg.InferRequestedOutput("label")], headers=h, model_version="1")
    assert only.as_numpy("y") is None
    np.testing.assert_array_equal(only.as_numpy("label"), want[1])
    # typed contents (fp32_contents) instead of raw bytes: what other OIP clients send
    req = pb.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    t.contents.fp32_contents.extend(X.reshape(-1).tolist())
    inputs, names = decode_request(req)
    np.testing.assert_array_equal(inputs["x"], X)
    assert names is None


def test_stream_infer_answers_each_request_and_reports_errors_in_band(gw, client) -> None:
    """Each request of a stream is answered, a failed one in band; each is an access-log entry."""
    results: queue.Queue = queue.Queue()
    key, token = gw.keys.create("streamer", ["infer"])
    inp = tg.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    bad = tg.InferInput("x", [1, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with gw.access_entries() as log:
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            headers={"x-api-key": token})
        client.async_stream_infer("mlp", [inp], request_id="a")
        client.async_stream_infer("mlp", [bad], request_id="b")
        client.async_stream_infer("mlp", [inp], request_id="c")
        got = [results.get(timeout=30) for _ in range(3)]
        client.stop_stream()
    assert [(x["path"].rsplit("/", 1)[1], x["request_id"], x["status"], x["grpc_status"], x["key"]) for x in log] == [
        ("ModelStreamInfer", rid, status, grpc_status, key.id) for rid, status, grpc_status in
        (("a", 200, 0), ("b", 400, 3), ("c", 200, 0))]
    ok = [r for r, e in got if e is None]
    errs = [e for r, e in got if e is not None]
    assert sorted(r.get_response().id for r in ok) == ["a", "c"]
    assert len(errs) == 1 and "ERR_BAD_REQUEST" in str(errs[0]) and "has shape [1, 5], expected [" in str(errs[0])


def test_keys_and_permissions_as_over_http(gw, client) -> None:
    inp = tg.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp])
    assert _status(e.value) == "StatusCode.UNAUTHENTICATED" and "ERR_UNAUTHORIZED: missing API key" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp], headers={"x-api-key": "swd_000000000000_" + "A" * 43})
    assert _status(e.value) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("mlp", headers={"x-api-key": gw.key("models:write")})
    assert _status(e.value) == "StatusCode.PERMISSION_DENIED" and "models:read" in str(e.value)
    bearer = {"authorization": "Bearer " + gw.key("infer")}
    assert client.infer("mlp", [inp], headers=bearer).as_numpy("label") is not None
    limited = {"x-api-key": gw.key("infer", rate_rps=0.001, rate_burst=1)}
    client.infer("mlp", [inp], headers=limited)
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [inp], headers=limited)
    assert _status(e.value) == "StatusCode.RESOURCE_EXHAUSTED" and "ERR_RATE_LIMITED" in str(e.value)


def test_errors_map_to_grpc_status_codes(gw, client) -> None:
    h = {"x-api-key": gw.key("admin")}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nosuch", headers=h)
    assert _status(e.value) == "StatusCode.NOT_FOUND" and "ERR_NOT_FOUND" in str(e.value)
    bad = tg.InferInput("x", [2, 4], "INT32")
    bad.set_data_from_numpy(np.zeros((2, 4), np.int32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("mlp", [bad], headers=h)
    assert _status(e.value) == "StatusCode.INVALID_ARGUMENT" and "ERR_BAD_REQUEST" in str(e.value)


def test_calls_swarmd_does_not_build_say_which_feature(gw, client) -> None:
    h = {"x-api-key": gw.key("admin")}
    for call, feature in ((lambda: client.get_inference_statistics("mlp", headers=h), "statistics"),
                          (lambda: client.get_system_shared_memory_status(headers=h), "shared memory"),
                          (lambda: client.get_cuda_shared_memory_status(headers=h), "shared memory"),
                          (lambda: client.get_trace_settings(headers=h), "trace"),
                          (lambda: client.get_log_settings(headers=h), "log settings")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _status(e.value) == "StatusCode.UNIMPLEMENTED" and feature in str(e.value), str(e.value)
    # and the gateway still serves afterwards
    assert client.is_server_live()
    with gw.access_entries() as log:  # a call of a method it does not serve is still one access-log entry
        with pytest.raises(InferenceServerException):
            client.get_trace_settings(headers=h)
    assert [(x["path"], x["status"], x["grpc_status"]) for x in log] == [
        ("/inference.GRPCInferenceService/TraceSetting", 501, 12)]


def test_decode_refuses_malformed_requests_with_a_sentence() -> None:
    def req(**kw):
        r = pb.ModelInferRequest(model_name="m")
        r.inputs.add(name="x", datatype=kw.get("datatype", "FP32"), shape=kw.get("shape", [2]))
        for raw in kw.get("raw", []):
            r.raw_input_contents.append(raw)
        return r

    cases = [
        (pb.ModelInferRequest(model_name="m"), "no inputs"),
        (req(raw=[b"\0" * 8, b"\0" * 8]), "2 entries for 1 inputs"),
        (req(raw=[b"\0" * 7]), "7 raw bytes do not hold shape [2] of FP32"),
        (req(datatype="FP16"), "travels only in raw_input_contents"),
        (req(datatype="COMPLEX"), "datatype 'COMPLEX' is not supported"),
        (req(), "has 0 elements but shape [2] needs 2"),
        (req(datatype="BYTES", shape=[1], raw=[b"\x05\0\0\0ab"]), "claims 5 bytes"),
    ]
    for r, message in cases:
        with pytest.raises(OipError) as e:
            decode_request(r)
        assert message in str(e.value), (message, str(e.value))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_is_a_tensor_or_a_worded_error(blob: bytes) -> None:
    try:
        r = pb.ModelInferRequest.FromString(blob)
    except Exception:  # not even protobuf: grpc answers INTERNAL before our code runs
        return
    try:
        inputs, _ = decode_request(r)
    except OipError as e:
        assert str(e)
        return
    assert all(isinstance(v, np.ndarray) for v in inputs.values())


def test_bytes_tensors_round_trip() -> None:
    arr = np.array([b"ab", b"", "\u00e9".encode()], dtype=object)
    resp = encode_response("m", "1", "", {"s": arr}, None)
    assert resp.outputs[0].datatype == "BYTES"
    req = pb.ModelInferRequest(model_name="m", raw_input_contents=[resp.raw_output_contents[0]])
    req.inputs.add(name="s", datatype="BYTES", shape=[3])
    assert list(decode_request(req)[0]["s"]) == list(arr)


def test_daemon_serves_grpc_when_asked(daemons, tmp_path) -> None:
    from tests.conftest import run_cli, swarmd_env

    install_model(tmp_path / "models", "mlp", "1", MODEL)
    env = swarmd_env(SWARMD_GATEWAY_LOCAL_MODELS_DIR=str(tmp_path / "models"))
    d = daemons("--role", "gateway", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "g"), env=env)
    ports = d.wait_event("ready")["ports"]
    c = tg.InferenceServerClient(url=f"127.0.0.1:{ports['grpc']}")
    try:
        assert c.is_server_live() and c.is_server_ready()
    finally:
        c.close()
    assert d.stop() == 0
    r = run_cli("--role", "gateway", "--grpc", "nowhere", "--data-dir", str(tmp_path / "h"))
    assert r.returncode != 0 and "gateway.grpc 'nowhere' must look like HOST:PORT" in r.stderr


def test_async_infer_calls_back_with_each_result(gw, client) -> None:
    done: queue.Queue = queue.Queue()
    h = {"x-api-key": gw.key("infer")}
    for i in range(4):
        x = np.full((1, 4), i, np.float32)
        inp = tg.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.async_infer("mlp", [inp], callback=functools.partial(lambda x, result, error: done.put(
            (x, result, error)), x), headers=h, request_id=str(i))
    for _ in range(4):
        x, r, e = done.get(timeout=30)
        assert e is None
        np.testing.assert_allclose(r.as_numpy("y"), reference(MODEL, x)[0], rtol=1e-6)


def test_each_call_is_an_access_log_entry(gw, client) -> None:
    """Every gRPC call is an entry of the HTTP front's access log (gateway.access_log): its method
    path, the HTTP status the metrics count it as, the gRPC status it was answered with, its
    request id, key id and peer."""
    key, token = gw.keys.create("logged", ["infer"])
    inp = tg.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    with gw.access_entries() as log:
        client.infer("mlp", [inp], headers={"x-api-key": token}, request_id="ok-1")
        with pytest.raises(InferenceServerException) as e:
            client.infer("nope", [inp], headers={"x-api-key": token}, request_id="missing-1")
        assert _status(e.value) == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as e:
            client.infer("mlp", [inp], headers={"x-api-key": "swd_000000000000_" + "A" * 43}, request_id="bad-key")
        assert _status(e.value) == "StatusCode.UNAUTHENTICATED"
    assert [(x["request_id"], x["status"], x["grpc_status"], x["key"]) for x in log] == [
        ("ok-1", 200, 0, key.id), ("missing-1", 404, 5, key.id), ("bad-key", 401, 16, None)]
    for x in log:
        assert x["method"] == "GRPC" and x["path"] == "/inference.GRPCInferenceService/ModelInfer"
        assert x["peer"] == "127.0.0.1" and x["ms"] >= 0


# -- the lean lane (gateway.grpc_engine = "lean") with other clients and hostile ones ---------


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    data = tmp_path_factory.mktemp("gwlean")
    install_model(data / "models", "mlp", "1", MODEL)
    g = GatewayThread(data, GatewayConfig(header_timeout=0.5, body_timeout=0.5, max_body_bytes=1 << 20))
    g.grpc_port = g.call(g.gateway.start_grpc("127.0.0.1", 0))
    yield g
    g.close()


def test_lean_lane_serves_a_stock_grpc_channel(lean) -> None:
    import grpc

    key = lean.key("infer")
    req = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[X.tobytes()], id="s1")
    req.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    with grpc.insecure_channel(f"127.0.0.1:{lean.grpc_port}") as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=pb.ModelInferResponse.FromString)
        futures = [infer.future(req, metadata=(("x-api-key", key),), timeout=30) for _ in range(40)]
        for f in futures:  # many calls in flight on one connection
            r = f.result()
            assert r.id == "s1"
            np.testing.assert_allclose(np.frombuffer(r.raw_output_contents[0], np.float32).reshape(2, 3),
                                       reference(MODEL, X)[0], rtol=1e-6)
        big = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[bytes(2 << 20)])
        big.inputs.add(name="x", datatype="FP32", shape=[1 << 17, 4])
        with pytest.raises(grpc.RpcError) as e:
            infer(big, metadata=(("x-api-key", key),), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ERR_TOO_LARGE" in e.value.details()
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes as they are
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff", metadata=(("x-api-key", key),), timeout=30)  # not a protobuf message
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in e.value.details()
        live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive",
                              request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.ServerLiveResponse.FromString)
        assert live(pb.ServerLiveRequest(), timeout=30).live


def test_lean_lane_refuses_hostile_clients_and_keeps_serving(lean) -> None:
    import socket
    import struct

    from swarmd.gateway import grpc_wire as w

    def exchange(data: bytes) -> bytes:
        """What the lane answers to `data` until it closes the connection (the test fails if it does not)."""
        with socket.create_connection(("127.0.0.1", lean.grpc_port), timeout=10) as s:
            s.sendall(data)
            chunks = []
            while c := s.recv(65536):  # a TimeoutError here: the lane left the connection open
                chunks.append(c)
            return b"".join(chunks)

    out = exchange(w.PREFACE + w.frame(w.SETTINGS, 0, 0) + w.frame(w.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"))
    assert b"WINDOW_UPDATE of 0 on the connection" in out
    assert struct.pack(">II", 0, w.PROTOCOL_ERROR) + b"WINDOW_UPDATE" in out  # GOAWAY: last stream 0, its code
    assert b"not an HTTP/2 connection preface" in exchange(b"GET / HTTP/1.1\r\n\r\n")
    # slowloris: half a frame, never finished: GOAWAY after header_timeout, then closed
    assert b"stayed incomplete" in exchange(w.PREFACE + w.frame(w.SETTINGS, 0, 0)[:5])
    assert bytes([w.GOAWAY]) not in exchange(w.PREFACE[:10])  # no preface within header_timeout: closed
    # a request message that never completes (whole frames, half a message): DEADLINE_EXCEEDED after body_timeout
    import hpack

    head = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/"
                                   "ServerLive"), ("content-type", "application/grpc"), ("te", "trailers")])
    with socket.create_connection(("127.0.0.1", lean.grpc_port), timeout=10) as s:
        s.sendall(w.PREFACE + w.frame(w.SETTINGS, 0, 0) + w.frame(w.HEADERS, w.END_HEADERS, 1, head)
                  + w.frame(w.DATA, 0, 1, b"\0\0\0\0\x10abc"))
        with lean.access_entries() as log:
            got = b""
            while b"did not arrive within" not in got:
                got += s.recv(65536)  # a TimeoutError here: the lane never timed the message out
        assert b"grpc-status" in got and b"gateway.body_timeout" in got
    assert [(x["path"], x["status"], x["grpc_status"]) for x in log] == [  # ended by the lane, logged all the same
        ("/inference.GRPCInferenceService/ServerLive", 504, 4)]
    assert log[0]["ms"] >= 500  # from its headers on (body_timeout = 0.5 s)
    # a stream request that is not a protobuf message ends its stream, and is an entry of its own
    with lean.access_entries() as log:
        _raw_call(lean.grpc_port, b"\xff\xff", [("x-api-key", lean.key("infer"))],
                  b"not a valid protobuf", method="ModelStreamInfer")
    assert [(x["path"], x["status"], x["grpc_status"]) for x in log] == [
        ("/inference.GRPCInferenceService/ModelStreamInfer", 400, 3)]
    c = tg.InferenceServerClient(url=f"127.0.0.1:{lean.grpc_port}")
    try:
        assert c.is_server_live()
    finally:
        c.close()


@pytest.mark.parametrize("engine", ["lean", "grpcio"])
def test_overload_admission_answers_unavailable(engine, tmp_path) -> None:
    """The HTTP front's in-flight bound covers gRPC calls on either engine: over it, UNAVAILABLE."""
    install_model(tmp_path / "models", "mlp", "1", MODEL)
    g = GatewayThread(tmp_path, GatewayConfig(grpc_engine=engine, max_in_flight=0))
    try:
        port = g.call(g.gateway.start_grpc("127.0.0.1", 0))
        c = tg.InferenceServerClient(url=f"127.0.0.1:{port}")
        inp = tg.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        with pytest.raises(InferenceServerException) as e:
            c.infer("mlp", [inp], headers={"x-api-key": g.key("infer")})
        assert _status(e.value) == "StatusCode.UNAVAILABLE" and "ERR_OVERLOADED" in str(e.value)
        c.close()
    finally:
        g.close()


def _infer_stub(ch):
    """A raw ModelInfer callable on the grpc channel `ch`, with a request of the test's MLP."""
    req = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[X.tobytes()], id="t")
    req.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                           request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=pb.ModelInferResponse.FromString)
    return infer, req


def _raw_send(port: int, msg: bytes, headers: list[tuple[str, str]], method: str = "ModelInfer") -> socket.socket:
    """A connection with one call sent on it in raw HTTP/2 frames, its request message `msg` as it
    is (a grpc-timeout header in `headers` is one that, unlike a stock client, this one does not
    enforce itself); the caller reads and closes it."""
    import struct

    import hpack

    from swarmd.gateway import grpc_wire as w

    head = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1"),
                                   (":path", f"/inference.GRPCInferenceService/{method}"),
                                   ("content-type", "application/grpc"), ("te", "trailers"), *headers])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(w.PREFACE + w.frame(w.SETTINGS, 0, 0) + w.frame(w.HEADERS, w.END_HEADERS, 1, head)
              + w.frame(w.DATA, w.END_STREAM, 1, struct.pack(">BI", 0, len(msg)) + msg))
    return s


def _raw_call(port: int, msg: bytes, headers: list[tuple[str, str]], until: bytes, method: str = "ModelInfer"
              ) -> bytes:
    """_raw_send's call: what the lane answers, up to `until`."""
    with _raw_send(port, msg, headers, method) as s:
        got = b""
        while until not in got:
            got += s.recv(65536)  # a TimeoutError here: the lane never answered that
        return got


def test_lean_model_infer_without_a_task_drops_cancelled_calls_and_times_out(tmp_path) -> None:
    """The lean lane serves a ModelInfer without grpc-timeout from the backend's future (no Task):
    a call its client cancels while it waits for a run slot is never run and leaves the in-flight
    count; past gateway.infer_timeout a call answers DEADLINE_EXCEEDED ERR_TIMEOUT. Each call is
    one access-log entry with the status it ended with."""
    import grpc

    install_model(tmp_path / "models", "mlp", "1", MODEL)
    g = GatewayThread(tmp_path, GatewayConfig())
    gw = g.gateway
    assert gw is not None
    try:
        port = g.call(gw.start_grpc("127.0.0.1", 0))
        md = (("x-api-key", g.key("infer")),)
        with g.held_runs("mlp") as (runs, blocker), g.access_entries() as log, \
                grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            infer, req = _infer_stub(ch)
            a, b = (infer.future(req, metadata=md) for _ in range(2))  # no timeout: no grpc-timeout header
            g.until(lambda: len(runs) == 2)  # both run slots held
            calls = [c for conn in gw.grpc.conns for c in conn.calls.values()]
            assert calls and all(c.task is not None and not isinstance(c.task, asyncio.Task) for c in calls)
            c = infer.future(req, metadata=md)
            g.until(lambda: gw._in_flight == 3)
            c.cancel()  # RST_STREAM while it waits for a slot
            g.until(lambda: gw._in_flight == 2)
            blocker.set()
            for f in (a, b):
                assert f.result(timeout=30).id == "t"
            assert infer.future(req, metadata=md).result(timeout=30).model_version == "1"
            assert len(runs) == 3  # a, b and the last one: the cancelled call never ran
            g.until(lambda: gw._in_flight == 0)
            blocker.clear()
            gw._deadlines = Deadlines(0.3)  # gateway.infer_timeout from here on; the held run outlasts it
            late = infer.future(req, metadata=md)
            with pytest.raises(grpc.RpcError) as e:
                late.result(timeout=30)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert e.value.details().startswith("ERR_TIMEOUT: inference took longer than 0.3s")
            g.until(lambda: gw._in_flight == 0)
        assert sorted((x["grpc_status"], x["status"]) for x in log) == [(0, 200)] * 3 + [(1, 499), (4, 504)]
    finally:
        g.close()


@pytest.mark.parametrize("engine", ["lean", "grpcio"])
def test_model_infer_in_a_task_leaves_in_flight_when_cancelled_or_timed_out(engine, tmp_path) -> None:
    """A ModelInfer served in a Task (OipService.call: every call on grpcio, one with a grpc-timeout
    on the lean lane) gives its in-flight count back when its client cancels it, when its
    grpc-timeout passes and when gateway.infer_timeout does."""
    import grpc

    install_model(tmp_path / "models", "mlp", "1", MODEL)
    g = GatewayThread(tmp_path, GatewayConfig(grpc_engine=engine))
    gw = g.gateway
    assert gw is not None
    try:
        port = g.call(gw.start_grpc("127.0.0.1", 0))
        token = g.key("infer")
        md = (("x-api-key", token),)
        with g.held_runs("mlp") as (runs, blocker), g.access_entries() as log, \
                grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            infer, req = _infer_stub(ch)
            c = infer.future(req, metadata=md, timeout=60)  # a grpc-timeout: the Task path on either engine
            g.until(lambda: len(runs) == 1 and gw._in_flight == 1)
            c.cancel()
            g.until(lambda: gw._in_flight == 0)
            late = infer.future(req, metadata=md, timeout=0.5)  # its run is held past its grpc-timeout
            with pytest.raises(grpc.RpcError) as e:
                late.result(timeout=30)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            g.until(lambda: gw._in_flight == 0)
            if engine == "lean":  # the lane's own grpc-timeout (a stock client cancels at its deadline first)
                _raw_call(port, req.SerializeToString(), [("x-api-key", token), ("grpc-timeout", "300m")],
                          b"ERR_TIMEOUT: the call's grpc-timeout (0.3s) passed")
                g.until(lambda: gw._in_flight == 0)
            gw._deadlines = Deadlines(0.3)  # gateway.infer_timeout, shorter than the call's grpc-timeout
            slow = infer.future(req, metadata=md, timeout=60)
            with pytest.raises(grpc.RpcError) as e:
                slow.result(timeout=30)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert e.value.details().startswith("ERR_TIMEOUT: inference took longer than 0.3s")
            g.until(lambda: gw._in_flight == 0)
            blocker.set()
            assert infer(req, metadata=md, timeout=30).id == "t"
            g.until(lambda: gw._in_flight == 0)
        statuses = [(x["grpc_status"], x["status"]) for x in log]
        # the 0.5 s call: the server's timer (lean) or the client's cancel at its deadline, whichever came first
        assert statuses[1] in ((1, 499), (4, 504))
        assert [statuses[0], *statuses[2:]] == [(1, 499)] + [(4, 504)] * (engine == "lean") + [(4, 504), (0, 200)]
    finally:
        g.close()


def test_grpcio_counts_a_call_past_its_deadline_as_deadline_exceeded_not_a_cancel(tmp_path) -> None:
    """grpcio enforces a call's grpc-timeout by cancelling its handler, as it does when the client
    goes away; the front tells the two apart by the time the call has left, so a call that ran
    past its deadline is counted DEADLINE_EXCEEDED / 504 (as on the lean lane) and a client's
    cancel 499. The timed-out call comes from a raw client that does not enforce its deadline
    itself, so grpcio's own timer is what ends it."""
    import grpc

    install_model(tmp_path / "models", "mlp", "1", MODEL)
    g = GatewayThread(tmp_path, GatewayConfig(grpc_engine="grpcio"))
    gw = g.gateway
    assert gw is not None
    try:
        port = g.call(gw.start_grpc("127.0.0.1", 0))
        token = g.key("infer")
        with g.held_runs("mlp") as (runs, blocker), g.access_entries() as log, \
                grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            infer, req = _infer_stub(ch)
            with _raw_send(port, req.SerializeToString(), [("x-api-key", token), ("grpc-timeout", "300m")]):
                g.until(lambda: len(runs) == 1 and gw._in_flight == 1)
                g.until(lambda: gw._in_flight == 0)  # grpcio's deadline, not the client (still connected)
            c = infer.future(req, metadata=(("x-api-key", token),), timeout=60)
            g.until(lambda: len(runs) == 2 and gw._in_flight == 1)
            c.cancel()
            g.until(lambda: gw._in_flight == 0)
            blocker.set()
        assert [(x["grpc_status"], x["status"]) for x in log] == [(4, 504), (1, 499)]
        metrics = g.request("GET", "/metrics", key=g.admin_key).body.decode()  # counted the same way there
        assert 'swarmd_gateway_requests_total{route="grpc:ModelInfer",method="GRPC",status="504"} 1' in metrics
        assert 'swarmd_gateway_requests_total{route="grpc:ModelInfer",method="GRPC",status="499"} 1' in metrics
    finally:
        g.close()


def test_lean_model_infer_on_a_backend_without_futures_is_checked_once(tmp_path) -> None:
    """A backend that cannot answer through a future (the swarm's has no submit) is served in a
    Task; the call is admitted and its key counted once, not once per path tried."""
    install_model(tmp_path / "models", "mlp", "1", MODEL)
    g = GatewayThread(tmp_path, GatewayConfig())
    try:
        g.gateway.backend = _WithoutFutures(g.backend)
        assert not g.gateway.can_infer_soon()
        port = g.call(g.gateway.start_grpc("127.0.0.1", 0))
        key, token = g.keys.create("once", ["infer"])
        c = tg.InferenceServerClient(url=f"127.0.0.1:{port}")
        inp = tg.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        for _ in range(3):
            r = c.infer("mlp", [inp], headers={"x-api-key": token})
            np.testing.assert_allclose(r.as_numpy("y"), reference(MODEL, X)[0], rtol=1e-6)
        c.close()
        g.until(lambda: g.keys.flush() or True)
        assert g.keys.get(key.id).requests == 3
    finally:
        g.close()


class _WithoutFutures:
    """A LocalBackend seen without its submit(), as the swarm backend is."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        if name == "submit":
            raise AttributeError(name)
        return getattr(self._inner, name)
