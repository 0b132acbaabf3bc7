"""The gateway's HTTP port under hostile clients: slow headers, slow bodies, floods, garbage.

Real sockets on loopback against a real Gateway; after every attack the port
still answers /health and the connection count returns to what it was.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time

import pytest

from swarmd.gateway.config import GatewayConfig
from tests.gateway_fixtures import GatewayThread, install_model, tiny_mlp

WAIT = 30.0  # generous: the box is shared; the guard's own bounds are far below this


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data = tmp_path_factory.mktemp("gwhostile")
    install_model(data / "models", "mlp", "1", tiny_mlp(seed=3))
    cfg = GatewayConfig(header_timeout=0.5, body_timeout=0.5, keepalive_timeout=60.0, max_connections=8)
    g = GatewayThread(data, cfg)
    yield g
    g.close()


def closed_by_server(s: socket.socket, drip: bytes = b"", every: float = 0.1, until: bytes = b"") -> tuple[bool, bytes]:
    """Keep dripping `drip` one byte at a time (a slowloris client) until the server closes
    the connection (or sends `until`) or WAIT passes; returns (closed or answered, what the server sent)."""
    s.settimeout(every)
    got = b""
    deadline = time.monotonic() + WAIT
    i = 0
    while time.monotonic() < deadline:
        if drip:
            try:
                s.send(drip[i % len(drip):i % len(drip) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return True, got
            i += 1
        try:
            c = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not c:
            return True, got
        got += c
        if until and until in got:
            return True, got
    return False, got


def healthy(gw: GatewayThread) -> bool:
    """/health answers once the attack's connections are gone (the server may still be closing them)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if gw.gateway.guard.open == 0:
            try:
                return gw.request("GET", "/health").status == 200
            except (ConnectionError, http.client.HTTPException):
                pass  # flood connections still in the accept queue took the slots; they close at once
        time.sleep(0.05)
    return False


def test_slow_headers_are_cut_off(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed, _ = closed_by_server(s, drip=b"X-Slow: aaaaaaaaaa\r\n")
    assert closed, "a client dripping its headers kept the connection for the whole wait"
    assert gw.gateway.guard.timed_out >= 1
    assert healthy(gw)


def test_silent_connection_is_cut_off(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        closed, _ = closed_by_server(s)
    assert closed
    assert healthy(gw)


def test_slow_body_gets_a_timeout_error(gw):
    key = gw.key("infer")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"x-api-key: " + key.encode() + b"\r\nContent-Length: 100000\r\n\r\n{")
        _, got = closed_by_server(s, drip=b" ", every=0.1, until=b"ERR_TIMEOUT")
    assert b"ERR_TIMEOUT" in got, got[:300]
    assert healthy(gw)


def test_connection_flood_is_capped_and_recovers(gw):
    cap = gw.config.max_connections
    # keep-alive connections that completed a request: the header timer no longer applies to them
    held = []
    for _ in range(cap):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in s.recv(65536)
        held.append(s)
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as extra:
            closed, got = closed_by_server(extra, drip=b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed and b"200" not in got
        assert gw.gateway.guard.refused >= 1
    finally:
        for s in held:
            s.close()
    assert healthy(gw)


def test_garbage_oversized_and_half_open(gw):
    # garbage request lines and oversized headers get a 4xx and a close, never a hang
    for junk in (os.urandom(4096) + b"\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                 b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"):
        status = gw.raw(junk).split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.") and status.split(b" ")[1].startswith(b"4"), status
    # an oversized declared body is refused before it is read
    key = gw.key("infer")
    r = gw.raw(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nx-api-key: " + key.encode()
               + b"\r\nContent-Length: " + str(gw.config.max_body_bytes + 1).encode() + b"\r\n\r\n")
    assert b" 413 " in r.split(b"\r\n", 1)[0], r[:200]
    # half-open: many clients connect, send half a request and shut their write side
    socks = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Le")
        s.shutdown(socket.SHUT_WR)
        socks.append(s)
    for s in socks:
        closed, _ = closed_by_server(s)
        assert closed
        s.close()
    assert healthy(gw)


def test_flood_of_short_connections_keeps_serving(gw):
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(30):
                with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                    s.sendall(os.urandom(64))
        except OSError as e:  # a refused connect under the cap is the point; a hang is not
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert healthy(gw)


def test_blank_lines_before_a_request_do_not_stop_the_header_timer(gw):
    before = gw.gateway.guard.timed_out
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"\r\n\r\n\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n")  # blank lines: ignored by HTTP, not a header end
        closed, got = closed_by_server(s, drip=b"X-Slow: aaaaaaaaaa\r\n")
    assert closed and b"200" not in got, "a blank-line prefix let a client drip its headers for the whole wait"
    assert gw.gateway.guard.timed_out > before
    assert healthy(gw)


def test_every_keep_alive_request_has_the_header_timer(gw):
    before = gw.gateway.guard.timed_out
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in s.recv(65536)
        # idle between requests is the keep-alive timer's (60 s here), not the header timer's
        s.settimeout(4 * gw.config.header_timeout)
        with pytest.raises(TimeoutError):
            s.recv(1)
        # the next request starts and then drips: cut off like a first request
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        closed, got = closed_by_server(s, drip=b"X-Slow: aaaaaaaaaa\r\n")
    assert closed and b"200" not in got, "a kept-alive connection dripped its second request's headers all along"
    assert gw.gateway.guard.timed_out > before
    assert healthy(gw)


def test_a_pipelined_request_that_stalls_has_the_header_timer(gw):
    before = gw.gateway.guard.timed_out
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        # one read holds a whole request and the start of the next; then the client goes quiet,
        # which aiohttp's keep-alive timer (60 s here) would allow: a stalled request, not an idle connection
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n")
        closed, got = closed_by_server(s)
    assert b"200 OK" in got, "the complete first request was answered"
    assert closed and got.count(b"200 OK") == 1, "a stalled pipelined request held the connection like an idle one"
    assert gw.gateway.guard.timed_out > before
    assert healthy(gw)


def test_a_request_dripped_while_the_previous_one_is_answered_has_the_header_timer(gw):
    key = gw.key("infer")
    body = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}'
    before = gw.gateway.guard.timed_out
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        # a request with a body, complete, then the next request's bytes one at a time from its first byte on
        s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-api-key: "
                  + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        closed, got = closed_by_server(s, drip=b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: aaaaaaaaaa\r\n" * 1000)
    assert closed and b"/health" not in got
    assert gw.gateway.guard.timed_out > before
    assert healthy(gw)


def test_pipelined_complete_requests_leave_an_idle_connection_to_the_keep_alive_timer(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while got.count(b"200 OK") < 2:
            c = s.recv(65536)
            assert c, "the server closed a connection with two complete requests"
            got += c
        s.settimeout(4 * gw.config.header_timeout)
        with pytest.raises(TimeoutError):  # idle now: the keep-alive timer's, not the header timer's
            s.recv(1)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in s.recv(65536)


def test_connections_per_client_address_are_capped(tmp_path):
    install_model(tmp_path / "models", "mlp", "1", tiny_mlp(seed=3))
    g = GatewayThread(tmp_path, GatewayConfig(max_connections=64, max_connections_per_address=4))
    held = []
    try:
        for _ in range(4):  # one address takes its whole share with kept-alive connections
            s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in s.recv(65536)
            held.append(s)
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as extra:
            closed, got = closed_by_server(extra, drip=b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed and b"200" not in got
        # another client address is still served meanwhile
        with socket.create_connection(("127.0.0.1", g.port), timeout=10, source_address=("127.0.0.2", 0)) as other:
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            _, got = closed_by_server(other)
        assert b"200 OK" in got
    finally:
        for s in held:
            s.close()
        g.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_json_body_is_refused_with_413_and_bounded_memory(gw):
    key = gw.key("infer")
    limit = gw.config.max_json_bytes
    # declared: refused before a byte of the body is read
    r = gw.raw(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nx-api-key: "
               + key.encode() + b"\r\nContent-Length: " + str(60 << 20).encode() + b"\r\n\r\n")
    assert b" 413 " in r.split(b"\r\n", 1)[0], r[:200]
    assert b"max_json_bytes" in r
    # chunked (no length): read up to the limit, never parsed
    numbers = b"[" + b"1," * ((limit + (2 << 20)) // 2) + b"1]"
    doc = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":' + numbers + b"}]}"
    before = _rss()
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    conn.request("POST", "/v2/models/mlp/infer", body=iter([doc[i:i + 65536] for i in range(0, len(doc), 65536)]),
                 headers={"x-api-key": key, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                 encode_chunked=True)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 413, body[:200]
    # the parsed document would have cost ~14x its size (840 MiB for 60 MiB); the raw body is all it held
    assert _rss() - before < 6 * len(doc), (_rss() - before, len(doc))
    assert healthy(gw)


def test_deeply_nested_bytes_is_a_clear_400(gw):
    key = gw.key("infer")
    data = b"[" * 900 + b'"a"' + b"]" * 900
    doc = b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":' + data + b"}]}"
    r = gw.request("POST", "/v2/models/mlp/infer", body=doc, key=key, headers={"Content-Type": "application/json"})
    assert r.status == 400, (r.status, r.body[:300])
    assert "nested deeper" in r.json()["error"]
    assert healthy(gw)
