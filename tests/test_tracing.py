"""OpenTelemetry tracing across processes: the caller's W3C trace continues through the gateway
(HTTP and gRPC), the router and the RPC envelope's meta element into the worker's queue, batch
and run. Each daemon writes its spans to a file (tracing.exporter = "file"); the test joins them."""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from swarmd.errors import ERR_BAD_REQUEST
from swarmd.node import tracing
from swarmd.node.tracing import TracingConfig
from swarmd.rpc import envelope
from tests.conftest import swarmd_env
from tests.gateway_fixtures import reference, tiny_mlp


def _spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tree(spans: list[dict[str, Any]], trace_hex: str) -> dict[str, list[dict[str, Any]]]:
    """The spans of one trace by name."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        if s["context"]["trace_id"] == "0x" + trace_hex:
            out.setdefault(s["name"], []).append(s)
    return out


def _parent(s: dict[str, Any]) -> str | None:
    return s["parent_id"]


def _id(s: dict[str, Any]) -> str:
    return s["context"]["span_id"]


def test_one_trace_spans_gateway_and_worker_processes(daemons, tmp_path) -> None:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    model = tiny_mlp(seed=3)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(model)
    w_spans, g_spans = tmp_path / "worker.jsonl", tmp_path / "gateway.jsonl"
    trace = {"SWARMD_TRACING_ENABLED": "true", "SWARMD_TRACING_EXPORTER": "file"}
    w = daemons("--role", "bootstrap,worker", "--data-dir", str(tmp_path / "w"),
                env=swarmd_env(SWARMD_WORKER_MODELS=f"mlp={path}", SWARMD_TRACING_FILE=str(w_spans), **trace))
    boot = f"127.0.0.1:{w.wait_event('ready')['ports']['dht']}"
    g = daemons("--role", "gateway", "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--bootstrap", boot,
                "--data-dir", str(tmp_path / "g"),
                env=swarmd_env(SWARMD_GATEWAY_AUTH="false", SWARMD_GATEWAY_ACCESS_LOG="false",
                               SWARMD_TRACING_FILE=str(g_spans), **trace))
    ports = g.wait_event("ready")["ports"]
    x = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
    http_trace, grpc_trace, stream_trace = os.urandom(16).hex(), os.urandom(16).hex(), os.urandom(16).hex()
    http = th.InferenceServerClient(f"127.0.0.1:{ports['http']}", network_timeout=60.0)
    inp = th.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(120):  # the gateway finds the worker on the DHT on its own schedule
        try:
            http.infer("mlp", [inp], headers={"traceparent": f"00-{os.urandom(16).hex()}-{'1' * 16}-01"})
            break
        except Exception:
            time.sleep(0.5)
    r = http.infer("mlp", [inp], headers={"traceparent": f"00-{http_trace}-{'a' * 16}-01"})
    np.testing.assert_allclose(r.as_numpy("y"), reference(model, x)[0], rtol=1e-5)
    grpc = tg.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    try:
        gi = tg.InferInput("x", [1, 4], "FP32")
        gi.set_data_from_numpy(x)
        grpc.infer("mlp", [gi], headers={"traceparent": f"00-{grpc_trace}-{'b' * 16}-01"})
        done: queue.Queue = queue.Queue()
        grpc.start_stream(callback=lambda result, error: done.put((result, error)),
                          headers={"traceparent": f"00-{stream_trace}-{'d' * 16}-01"})
        grpc.async_stream_infer("mlp", [gi], request_id="s1")
        assert done.get(timeout=60)[1] is None
        grpc.stop_stream()
    finally:
        grpc.close()
    assert g.stop() == 0 and w.stop() == 0  # a graceful stop exports what is buffered

    for trace_hex, front, caller in ((http_trace, "http", "a" * 16), (grpc_trace, "grpc", "b" * 16),
                                     (stream_trace, "grpc", "d" * 16)):
        gw = _tree(_spans(g_spans), trace_hex)
        wk = _tree(_spans(w_spans), trace_hex)
        (root,) = gw["gateway.infer"]
        assert _parent(root) == "0x" + caller  # the caller's trace continues
        assert root["kind"] == "SpanKind.SERVER" and root["attributes"]["swarmd.front"] == front
        (route,) = gw["router.route"]
        assert _parent(route) == _id(root)
        (client,) = gw["rpc runInference"]
        assert client["kind"] == "SpanKind.CLIENT" and _parent(client) == _id(route)
        # the worker's process: its spans hang under the gateway's client span
        (server,) = wk["rpc runInference"]
        assert server["kind"] == "SpanKind.SERVER" and _parent(server) == _id(client)
        assert server["resource"]["attributes"]["service.instance.id"] != root["resource"]["attributes"][
            "service.instance.id"]
        (waited,) = wk["worker.queue"]
        (batch,) = wk["worker.batch"]
        (run,) = wk["worker.run"]
        assert _parent(waited) == _id(server) and _parent(batch) == _id(server) and _parent(run) == _id(batch)
        assert batch["attributes"]["swarmd.batch.requests"] >= 1
        times = [waited["start_time"], waited["end_time"], batch["start_time"], run["start_time"], run["end_time"],
                 batch["end_time"]]
        assert times == sorted(times), times
    # the warm-up requests' traces are there too, but no span of the worker lacks a trace
    # from the gateway: nothing was traced outside a request (health checks, DHT, announces)
    gateway_ids = {s["context"]["span_id"] for s in _spans(g_spans)}
    for s in _spans(w_spans):
        if s["name"] == "rpc runInference":
            assert _parent(s) in gateway_ids


def test_request_meta_is_optional_and_ignored_when_unknown() -> None:
    msg = envelope.decode(envelope.request(7, "m", {"a": 1}, 100, 0, {"traceparent": "00-" + "1" * 32 + "-" +
                                                                       "2" * 16 + "-01"}))
    assert msg[:6] == [0, 7, "m", {"a": 1}, 100, 0] and envelope.request_meta(msg)["traceparent"].startswith("00-")
    assert envelope.request_meta(envelope.decode(envelope.request(7, "m", None, None))) is None
    # a meta that is not a map, and elements a later version appends, are ignored
    from swarmd.rpc.codec import packb

    assert envelope.request_meta(envelope.decode(packb([0, 1, "m", None, None, 0, "junk"]))) is None
    assert envelope.decode(packb([0, 1, "m", None, None, 0, {}, 5, 6]))[1] == 1
    with pytest.raises(envelope.EnvelopeError) as e:
        envelope.decode(packb([0, 1, "m", None, None]))
    assert e.value.request_id == 1 and "at least 6 elements" in e.value.message


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.start(TracingConfig(), exporter=exporter)
    yield exporter
    tracing.stop()


async def _pair(handler: Any) -> tuple[Any, Any]:
    from swarmd.node.identity import Identity
    from swarmd.rpc import Methods, RpcServer, connect

    methods = Methods()
    methods.register("echo", handler, op="r")
    srv = RpcServer(Identity.generate(), methods)
    await srv.start()
    peer = await connect(Identity.generate(), "127.0.0.1", srv.port, remote_public_key=srv.identity.public_key,
                         timeout=20)
    return srv, peer


async def test_rpc_meta_carries_the_trace_and_an_old_peer_gets_none(spans) -> None:
    """Over a real connection: the callee's handler runs in a server span under the caller's
    client span. A peer before the meta element (it refuses 7-element requests) is asked again
    without it, once per connection."""
    from opentelemetry import trace

    seen: list[Any] = []

    async def echo(ctx: Any, params: Any) -> Any:
        seen.append(trace.get_current_span().get_span_context())
        return params

    srv, caller = await _pair(echo)
    real = envelope.decode
    try:
        with tracing.span("root"):
            assert await caller.call("echo", 5, timeout=20) == 5
        assert await caller.call("echo", 1, timeout=20) == 1  # outside a trace: no span, no meta

        def old_decode(data: bytes) -> list[Any]:  # a peer from before the meta element
            msg = real(data)
            if msg[0] == envelope.REQUEST and len(msg) != 6:
                raise envelope.EnvelopeError(f"request must have 6 elements, got {len(msg)}", msg[1])
            return msg

        envelope.decode = old_decode
        with tracing.span("old"):
            assert await caller.call("echo", 6, timeout=20) == 6
            assert caller._no_meta
            assert await caller.call("echo", 7, timeout=20) == 7
    finally:
        envelope.decode = real
        await caller.close()
        await srv.stop()
    done = spans.get_finished_spans()
    root = next(s for s in done if s.name == "root")
    client = next(s for s in done if s.name == "rpc echo" and s.kind is trace.SpanKind.CLIENT)
    server = next(s for s in done if s.name == "rpc echo" and s.kind is trace.SpanKind.SERVER)
    assert client.parent.span_id == root.context.span_id
    assert server.parent.span_id == client.context.span_id and server.context.trace_id == root.context.trace_id
    assert seen[0].span_id == server.context.span_id
    assert not seen[1].is_valid  # the untraced call ran outside any span
    # the old peer served both calls without a trace; only the first call's server span exists
    assert len(seen) == 4 and not seen[2].is_valid and not seen[3].is_valid
    assert [s.kind for s in done if s.name == "rpc echo"].count(trace.SpanKind.SERVER) == 1
    assert ERR_BAD_REQUEST == "ERR_BAD_REQUEST"


async def test_tracing_off_sends_no_meta() -> None:
    assert tracing.tracer is None

    async def echo(ctx: Any, params: Any) -> Any:
        return params

    srv, caller = await _pair(echo)
    sent: list[int] = []
    send = caller.conn.send_message

    def spy(data: bytes, *args: Any, **kw: Any) -> Any:
        sent.append(len(envelope.decode(data)))
        return send(data, *args, **kw)

    caller.conn.send_message = spy
    try:
        assert await caller.call("echo", 1, timeout=20) == 1
    finally:
        await caller.close()
        await srv.stop()
    assert sent == [6]


def test_otlp_flag_exports_to_a_collector(daemons, tmp_path) -> None:
    """`--otlp URL` turns tracing on and sends OTLP/HTTP protobuf to URL/v1/traces: a small
    collector on loopback receives the spans of one request through a one-process swarm."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    got: list[bytes] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            got.append(self.path.encode() + b" " + self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        model = tmp_path / "mlp.onnx"
        model.write_bytes(tiny_mlp(seed=5))
        d = daemons("--role", "bootstrap,worker,gateway", "--http", "127.0.0.1:0", "--data-dir", str(tmp_path / "n"),
                    "--otlp", f"http://127.0.0.1:{srv.server_port}",
                    env=swarmd_env(SWARMD_WORKER_MODELS=f"mlp={model}", SWARMD_GATEWAY_AUTH="false",
                                   SWARMD_GATEWAY_ACCESS_LOG="false"))
        port = d.wait_event("ready")["ports"]["http"]
        import tritonclient.http as th

        client = th.InferenceServerClient(f"127.0.0.1:{port}")
        inp = th.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        trace_hex = os.urandom(16).hex()
        for _ in range(120):
            try:
                client.infer("mlp", [inp], headers={"traceparent": f"00-{trace_hex}-{'c' * 16}-01"})
                break
            except Exception:
                time.sleep(0.5)
        assert d.stop() == 0
    finally:
        srv.shutdown()
    names: dict[str, bytes] = {}
    for body in got:
        path, _, data = body.partition(b" ")
        assert path == b"/v1/traces"
        req = ExportTraceServiceRequest.FromString(data)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    if s.trace_id.hex() == trace_hex:
                        names[s.name] = s.parent_span_id
    assert {"gateway.infer", "router.route", "worker.queue", "worker.batch", "worker.run"} <= set(names)
    assert names["gateway.infer"] == bytes.fromhex("c" * 16)


def test_tracing_config_is_checked() -> None:
    from swarmd.errors import ConfigError

    with pytest.raises(ConfigError, match="tracing.file"):
        TracingConfig(enabled=True, exporter="file").validate()
    with pytest.raises(ConfigError, match="sample_ratio"):
        TracingConfig(sample_ratio=1.5).validate()


@given(meta=st.one_of(st.none(), st.integers(-(2**63), 2**63), st.text(max_size=80), st.binary(max_size=40),
                      st.dictionaries(st.sampled_from(["traceparent", "tracestate", "x"]),
                                      st.one_of(st.text(max_size=300), st.integers(-(2**63), 2**63),
                                                st.binary(max_size=20)),
                                      max_size=3)),
       extra=st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3))
@settings(max_examples=300, deadline=None)
def test_any_meta_from_a_peer_is_a_context_or_ignored(meta: Any, extra: list[int]) -> None:
    """What a peer puts in meta (and after it) never fails the request's decoding, and names a
    parent only when it is a well-formed traceparent."""
    from swarmd.rpc.codec import packb

    tracing.start(TracingConfig(), exporter=InMemorySpanExporter())
    try:
        msg = envelope.decode(packb([0, 3, "m", None, 100, 0, meta, *extra]))
        got = envelope.request_meta(msg)
        assert got is None or type(got) is dict
        parent = tracing.extract(got)
        if parent is not None:
            tp = got["traceparent"]
            assert len(tp.split("-")) >= 4 and tp.split("-")[1] != "0" * 32
    finally:
        tracing.stop()
    assert tracing.extract({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None  # off: no propagator
