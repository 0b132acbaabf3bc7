"""The lean HTTP lane (swarmd/gateway/fastlane.py): the same answers as aiohttp's path, pipelining,
hand-over to aiohttp, body and keep-alive timers."""

from __future__ import annotations

import json
import socket
import time

import pytest

from swarmd.gateway.config import GatewayConfig
from tests.gateway_fixtures import GatewayThread, install_model, tiny_mlp

MODEL = tiny_mlp(seed=7)
INFER = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                "data": [0.1, 0.2, 0.3, 0.4]}]}).encode()


def _gateway(tmp_path_factory, name: str, **cfg) -> GatewayThread:
    data = tmp_path_factory.mktemp(name)
    install_model(data / "models", "mlp", "1", MODEL)
    return GatewayThread(data, GatewayConfig(cors_origins=["https://app.example"], **cfg))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same gateway twice: the lane on (the default) and off."""
    fast = _gateway(tmp_path_factory, "lane-on")
    slow = _gateway(tmp_path_factory, "lane-off", fast_lane=False)
    yield fast, slow
    fast.close()
    slow.close()


def post(path: str, body: bytes, **headers: str) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def read_answers(s: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """n HTTP answers from s (Content-Length bodies)."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        size = int(headers["content-length"])
        while len(buf) < size:
            buf += s.recv(65536)
        out.append((int(lines[0].split()[1]), headers, buf[:size]))
        buf = buf[size:]
    return out


def exchange(g: GatewayThread, data: bytes, n: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
        s.sendall(data)
        return read_answers(s, n)


def test_the_lane_answers_what_aiohttp_answers(pair):
    fast, slow = pair
    cases = []
    for g in pair:
        key = g.key("infer", rate_rps=1, rate_burst=1)
        reader = g.key("models:read")
        cases.append([
            post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, x_request_id="same-1"),
            post("/v2/models/mlp/versions/1/infer", INFER, x_api_key=g.admin_key, Origin="https://app.example"),
            post("/v2/models/mlp/infer", b"{not json", x_api_key=g.admin_key),
            post("/v2/models/nope/infer", INFER, x_api_key=g.admin_key),
            post("/v2/models/mlp/infer", INFER),
            post("/v2/models/mlp/infer", INFER, x_api_key=reader),
            post("/v2/models/mlp/infer", INFER, x_api_key=key),
            post("/v2/models/mlp/infer", INFER, x_api_key=key),  # over its rate: 429 + Retry-After
            post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, Inference_Header_Content_Length="x"),
            post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, Inference_Header_Content_Length="\u00b2"),
        ])
    before = fast.gateway.lane.served
    for a, b in zip(cases[0], cases[1], strict=True):
        (sa, ha, ba), = exchange(fast, a)
        (sb, hb, bb), = exchange(slow, b)
        da, db = json.loads(ba), json.loads(bb)
        for d in (da, db):
            d.pop("request_id", None)
            if "key" in d.get("error", ""):  # key ids differ between the two gateways
                d["error"] = d["error"].split("API key")[0]
        assert (sa, da) == (sb, db), a
        for h in ("content-type", "retry-after", "www-authenticate", "access-control-allow-origin", "vary",
                  "access-control-expose-headers"):
            assert ha.get(h) == hb.get(h), (h, a)
        assert ha["x-request-id"] and ("same-1" not in a.decode() or ha["x-request-id"] == "same-1")
    assert fast.gateway.lane.served - before == len(cases[0])


def test_pipelined_requests_are_answered_in_order_across_the_hand_over(pair):
    fast, _ = pair
    g = fast
    handed = g.gateway.lane.handed_off
    data = (post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, x_request_id="p-1")
            + post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, x_request_id="p-2")
            + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Request-Id: p-3\r\n\r\n"
            + post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, x_request_id="p-4"))
    answers = exchange(g, data, 4)
    assert [(s, h["x-request-id"]) for s, h, _ in answers] == [(200, "p-1"), (200, "p-2"), (200, "p-3"),
                                                              (200, "p-4")]
    assert json.loads(answers[2][2]) == {"live": True}
    assert g.gateway.lane.handed_off == handed + 1  # aiohttp took the connection at the GET, and kept it
    (status, _, body), = exchange(g, b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nx-api-key: "
                                  + g.admin_key.encode() + b"\r\n\r\n")
    lane = json.loads(body)["gateway"]["fast_lane"]
    assert status == 200 and lane["served"] == g.gateway.lane.served and lane["handed_off"] >= handed + 2


def test_a_body_sent_after_its_headers_is_served_by_the_lane(pair):
    g, _ = pair
    served = g.gateway.lane.served
    data = post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key)
    cut = data.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
        for part in (data[:10], data[10:cut], data[cut:cut + 7], data[cut + 7:]):
            s.sendall(part)
            time.sleep(0.05)
        (status, _, body), = read_answers(s, 1)
        assert status == 200 and json.loads(body)["outputs"]
        s.sendall(data)  # the same connection, kept alive
        assert read_answers(s, 1)[0][0] == 200
    assert g.gateway.lane.served == served + 2


def test_what_the_lane_does_not_take_goes_to_aiohttp(pair):
    g, _ = pair
    handed = g.gateway.lane.handed_off
    chunked = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"x-api-key: " + g.admin_key.encode() + b"\r\n\r\n"
               + f"{len(INFER):x}".encode() + b"\r\n" + INFER + b"\r\n0\r\n\r\n")
    assert exchange(g, chunked)[0][0] == 200
    assert exchange(g, post("/v2/models/ml%70/infer", INFER, x_api_key=g.admin_key))[0][0] == 200  # decoded
    assert exchange(g, post("/api/v1/inference/mlp", json.dumps({"input": [0.1, 0.2, 0.3, 0.4]}).encode(),
                            x_api_key=g.admin_key))[0][0] == 200
    assert g.gateway.lane.handed_off == handed + 3


def test_slow_body_is_504_then_closed_and_idle_keepalive_is_closed(tmp_path_factory):
    g = _gateway(tmp_path_factory, "lane-timers", body_timeout=0.5, keepalive_timeout=0.5)
    try:
        data = post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key)
        with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
            s.sendall(data[:-5])
            (status, _, body), = read_answers(s, 1)
            assert status == 504 and json.loads(body)["code"] == "ERR_TIMEOUT"
            assert s.recv(100) == b""  # closed after the answer
        with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
            s.sendall(data)
            assert read_answers(s, 1)[0][0] == 200
            t0 = time.monotonic()
            assert s.recv(100) == b""  # the idle kept-alive connection is closed by keepalive_timeout
            assert time.monotonic() - t0 < 15
        with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
            s.sendall(post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key, Connection="close"))
            (status, headers, _), = read_answers(s, 1)
            assert status == 200 and headers["connection"] == "close" and s.recv(100) == b""
    finally:
        g.close()


def test_a_slow_request_after_a_lane_request_still_meets_the_header_timeout(tmp_path_factory):
    """A kept-alive connection the lane served, then a request it hands to aiohttp, sent slowly."""
    g = _gateway(tmp_path_factory, "lane-slowloris", header_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", g.port), timeout=20) as s:
            s.sendall(post("/v2/models/mlp/infer", INFER, x_api_key=g.admin_key))
            assert read_answers(s, 1)[0][0] == 200
            s.sendall(b"GET /hea")  # not the lane's: handed over with its head unfinished
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by header_timeout, not kept for keepalive_timeout
            assert time.monotonic() - t0 < 10
        assert g.gateway.guard.timed_out >= 1
    finally:
        g.close()


def test_a_large_body_in_many_small_writes(tmp_path_factory):
    g = _gateway(tmp_path_factory, "lane-large")
    try:
        x = [[0.5, 0.25, 0.125, 1.0]] * 20000  # a ~0.6 MB JSON body
        body = json.dumps({"inputs": [{"name": "x", "shape": [20000, 4], "datatype": "FP32", "data": x}]}).encode()
        data = post("/v2/models/mlp/infer", body, x_api_key=g.admin_key)
        served = g.gateway.lane.served
        with socket.create_connection(("127.0.0.1", g.port), timeout=60) as s:
            for i in range(0, len(data), 1500):
                s.send(data[i:i + 1500])
            (status, _, out), = read_answers(s, 1)
        assert status == 200 and json.loads(out)["outputs"][0]["shape"][0] == 20000
        assert g.gateway.lane.served == served + 1
    finally:
        g.close()
