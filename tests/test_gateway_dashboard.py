"""The dashboard's page and feed over real HTTP (no browser: tests/test_dashboard_browser.py
drives Chromium), and the per-second traffic series it charts."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.dashboard import CSP, Traffic
from swarmd.gateway.metrics import Histogram
from tests.gateway_fixtures import GatewayThread, install_model, tiny_mlp

INFER = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [[0.1, 0.2, 0.3, 0.4]]}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    data = tmp_path_factory.mktemp("gwdash")
    install_model(data / "models", "mlp", "1", tiny_mlp(seed=2))
    g = GatewayThread(data, GatewayConfig())
    yield g
    g.close()


def test_page_is_public_static_and_locked_down(gw) -> None:
    r = gw.request("GET", "/dashboard")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP
    html = r.body.decode()
    for hook in ("api-key", "connect", "workers-count", "nodes-table", "models-table"):
        assert f'data-testid="{hook}"' in html
    assert "<script>" not in html  # no inline script: the CSP would refuse it anyway
    js = gw.request("GET", "/dashboard/dashboard.js")
    assert js.status == 200 and "x-api-key" in js.body.decode() and "innerHTML" not in js.body.decode()
    assert gw.request("GET", "/dashboard/dashboard.css").status == 200
    missing = gw.request("GET", "/dashboard/secrets.txt")
    assert missing.status == 404 and "no dashboard asset" in missing.json()["error"]


def test_feed_needs_a_reading_key(gw) -> None:
    assert gw.request("GET", "/api/v1/dashboard/feed").status == 401
    r = gw.request("GET", "/api/v1/dashboard/feed", key=gw.key("infer"))
    assert r.status == 403 and "models:read" in r.json()["error"]


def _first_frame(gw, key: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.request("GET", "/api/v1/dashboard/feed", headers={"x-api-key": key})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert resp.getheader("Cache-Control") == "no-store"
        for _ in range(50):
            line = resp.fp.readline(1 << 20)
            if line.startswith(b"data: "):
                return json.loads(line[6:])
        raise AssertionError("no data frame in the first 50 lines")
    finally:
        conn.close()


def test_feed_streams_snapshots_with_traffic_and_errors(gw) -> None:
    key = gw.key("infer")
    for _ in range(5):
        assert gw.request("POST", "/v2/models/mlp/infer", INFER, key=key).status == 200
    for reader in (gw.key("models:read"), gw.key("admin")):
        snap = _first_frame(gw, reader)
        assert {"nodes", "workers", "models", "traffic", "errors", "gateway"} <= set(snap)
        assert snap["gateway"]["auth"] is True and snap["gateway"]["url"].startswith("http://127.0.0.1:")
    # the sampler runs once a second; the five requests land in one point's count
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        snap = _first_frame(gw, gw.key("models:read"))
        if sum(p["rps"] for p in snap["traffic"]) >= 5:
            break
        time.sleep(0.5)
    assert sum(p["rps"] for p in snap["traffic"]) >= 5


def test_traffic_series_from_the_latency_histogram() -> None:
    h = Histogram("t", "t", ("route", "model", "status"))
    t = Traffic(h, history=3)
    for _ in range(98):
        h.observe(0.0007, "/v2/models/{model}/infer", "m", "200")  # bucket <= 1 ms
    h.observe(0.3, "/v2/models/{model}/infer", "m", "503")  # bucket <= 0.5 s
    h.observe(20.0, "/v2/models/{model}/infer", "m", "500")  # beyond the last bound
    h.observe(9.0, "/api/v1/dashboard/feed", "", "200")  # the feed itself is never counted
    t.sample(now=1.0)
    (p,) = t.points
    assert p["rps"] == 100 and p["errors"] == 2
    assert p["p50_ms"] == pytest.approx(1.0) and p["p99_ms"] == pytest.approx(500.0)
    t.sample(now=2.0)
    assert t.points[-1] == {"t": 2.0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": 0.0}
    for i in range(5):
        t.sample(now=3.0 + i)
    assert len(t.points) == 3  # bounded history


def test_router_health_snapshot_names_ejected_workers() -> None:
    from swarmd.orchestrator.health import HealthTracker

    h = HealthTracker(eject_after=2)
    h.call_failed("aa", "ERR_TIMEOUT")
    assert h.snapshot()["aa"]["ejected"] is False and h.snapshot()["aa"]["consecutive_failures"] == 1
    h.call_failed("aa", "ERR_TIMEOUT")
    snap = h.snapshot()
    assert snap["aa"]["ejected"] is True and snap["aa"]["healthy"] is False
