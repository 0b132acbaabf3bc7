"""The operator dashboard: one page, a live feed of the whole swarm, no build step.

`GET /dashboard` serves a static page (HTML, CSS and JavaScript shipped in
`swarmd/gateway/static/`); the page asks for an API key, keeps it in
sessionStorage and reads `GET /api/v1/dashboard/feed` with it in `x-api-key`:
a Server-Sent Events stream of snapshots (`data: {json}` every
`FEED_INTERVAL` seconds). Nothing secret ever travels in a URL.

What a snapshot holds and where it comes from:
- nodes: every key announcing a role topic (workers, stores, orchestrators,
  gateways, relays), each asked `node.info` (roles, version, uptime, NAT type);
  the path from this gateway (direct / punched / relayed) from the live
  connection pool. A node that stops answering turns `up: false` on the next
  round and keeps its `last_seen`, so the page greys it within one round.
- workers: the load a worker announces (state, queue, in flight, EWMA latency)
  and what the gateway's router knows of its health (ejected, draining).
- models: the stores' catalog (versions), which workers load each model and
  which stores hold it.
- traffic: requests/s, p50/p99 latency and 5xx errors per second over the
  last `HISTORY` seconds, read from the gateway's own latency histogram once a
  second (so nothing is added to the request path), and the last errors.

The swarm is only crawled while someone watches (one collector task, started
by the first viewer and stopped after the last leaves); the per-second traffic
sampler is a counter read and always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from loguru import logger

from swarmd.gateway.metrics import Histogram
from swarmd.versions import sort_versions

FEED_INTERVAL = 1.0  # seconds between snapshots sent to a viewer
COLLECT_INTERVAL = 2.0  # seconds between crawls of the swarm while someone watches
HISTORY = 300  # seconds of traffic kept for the charts
MAX_VIEWERS = 16  # concurrent feeds; one more gets 503
MAX_NODES = 256  # nodes asked node.info per round (the rest listed from their records only)
MAX_MODEL_LOOKUPS = 32  # models whose stores are looked up per round
RECENT_ERRORS = 20
INFO_TIMEOUT = 1.5  # seconds for one node.info answer
LOOKUP_TIMEOUT = 1.5  # seconds for one role-topic lookup
DASHBOARD_ROUTES = frozenset({"/dashboard", "/dashboard/{asset}", "/api/v1/dashboard/feed"})

# The page may run only its own script and style, talk only to this gateway, and not be framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS: dict[str, str] = {
    "dashboard.html": "text/html",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
}

Collect = Callable[[], Awaitable[dict[str, Any]]]


def _asset(name: str) -> bytes:
    return resources.files("swarmd.gateway").joinpath("static", name).read_bytes()


def _quantile(deltas: list[float], buckets: tuple[float, ...], q: float) -> float | None:
    """The q-quantile (seconds) of one second's latency histogram: the upper bound of
    the bucket it falls in (the last finite bound for the overflow bucket)."""
    total = sum(deltas)
    if total <= 0:
        return None
    rank = q * total
    cum = 0.0
    for i, n in enumerate(deltas):
        cum += n
        if cum >= rank:
            return buckets[min(i, len(buckets) - 1)]
    return buckets[-1]


class Traffic:
    """Per-second requests, latency quantiles and 5xx counts, diffed from a histogram
    whose labels are (route, model, status)."""

    def __init__(self, latency: Histogram, history: int = HISTORY) -> None:
        self.latency = latency
        self.points: deque[dict[str, Any]] = deque(maxlen=history)
        # counted from the histogram's own start, so requests before the first tick are not lost
        self._last: list[float] = [0.0] * (len(latency.buckets) + 1)
        self._last_errors = 0.0

    def _totals(self) -> tuple[list[float], float]:
        width = len(self.latency.buckets) + 1
        total = [0.0] * width
        errors = 0.0
        for (route, _model, status), s in list(self.latency.series.items()):
            if route in DASHBOARD_ROUTES:
                continue
            for i in range(width):
                total[i] += s[i]
            if status.isdigit() and int(status) >= 500:
                errors += sum(s[:width])
        return total, errors

    def sample(self, now: float | None = None) -> None:
        total, errors = self._totals()
        deltas = [a - b for a, b in zip(total, self._last, strict=True)]
        p50 = _quantile(deltas, self.latency.buckets, 0.50)
        p99 = _quantile(deltas, self.latency.buckets, 0.99)
        self.points.append({
            "t": round(now if now is not None else time.time(), 3),
            "rps": sum(deltas),
            "p50_ms": None if p50 is None else p50 * 1000,
            "p99_ms": None if p99 is None else p99 * 1000,
            "errors": errors - self._last_errors,
        })
        self._last, self._last_errors = total, errors


class Dashboard:
    """The page, its feed and the two loops behind them; owned by one Gateway."""

    def __init__(self, latency: Histogram, collect: Collect | None) -> None:
        self.traffic = Traffic(latency)
        self.errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self._collect = collect
        self._snapshot: dict[str, Any] = {"nodes": [], "workers": [], "models": [], "collected_at": None}
        self._fresh = asyncio.Event()
        self._viewers = 0
        self._sampler: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self.log = logger.bind(role="gateway", part="dashboard")

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._sampler = asyncio.get_running_loop().create_task(self._sample_loop(), name="dashboard-traffic")

    async def stop(self) -> None:
        self._closing.set()
        self._fresh.set()
        for task in (self._sampler, self._collector):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sampler = self._collector = None

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.traffic.sample()

    async def _collect_loop(self) -> None:
        while self._viewers > 0 and self._collect is not None:
            try:
                async with asyncio.timeout(COLLECT_INTERVAL * 4):
                    swarm = await self._collect()
                self._snapshot = {**swarm, "collected_at": round(time.time(), 3)}
            except Exception as e:  # a crawl that fails keeps the last view and says why
                self._snapshot = {**self._snapshot, "collect_error": f"{type(e).__name__}: {e}"}
                self.log.bind(event="dashboard_collect_failed").warning("dashboard crawl failed: {!r}", e)
            self._fresh.set()
            await asyncio.sleep(COLLECT_INTERVAL)
        self._collector = None

    # -- what the gateway calls ---------------------------------------------------

    def note_error(self, path: str, status: int, code: str, message: str) -> None:
        self.errors.appendleft({"t": round(time.time(), 3), "path": path[:200], "status": status,
                                "code": code, "message": message[:300]})

    def snapshot(self, gateway: dict[str, Any]) -> dict[str, Any]:
        return {**self._snapshot, "gateway": gateway, "traffic": list(self.traffic.points),
                "errors": list(self.errors), "sent_at": round(time.time(), 3)}

    # -- HTTP --------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        asset = request.match_info.get("asset", "dashboard.html")
        ctype = ASSETS.get(asset)
        if ctype is None:
            raise web.HTTPNotFound(text=f"no dashboard asset {asset!r}")
        return web.Response(body=_asset(asset), content_type=ctype, headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
        })

    async def feed(self, request: web.Request, gateway: Callable[[], dict[str, Any]]) -> web.StreamResponse:
        if self._viewers >= MAX_VIEWERS:
            raise web.HTTPServiceUnavailable(text=f"the dashboard feed already has {MAX_VIEWERS} viewers")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        self._viewers += 1
        if self._collector is None and self._collect is not None:
            self._collector = asyncio.get_running_loop().create_task(self._collect_loop(), name="dashboard-crawl")
        try:
            while not self._closing.is_set():
                await resp.write(b"data: " + orjson.dumps(self.snapshot(gateway())) + b"\n\n")
                self._fresh.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FEED_INTERVAL):
                        await self._fresh.wait()
        except (ConnectionResetError, ConnectionError):
            pass  # the viewer went away
        finally:
            self._viewers -= 1
        return resp


# -- the crawl: what the swarm looks like from this gateway ------------------------------


async def collect_swarm(swarm: Any, own: dict[str, Any], backend: Any, infos: dict[bytes, dict[str, Any]]) -> dict[str, Any]:
    """Nodes, workers and models as this gateway sees them now. `infos` is the caller's
    cache of node.info answers by key (kept across rounds for last_seen)."""
    from swarmd.swarm.paths import path_of
    from swarmd.topics import GATEWAYS, ORCHESTRATORS, RELAYS, STORES, WORKERS, model_topic

    role_topics = {"worker": WORKERS, "store": STORES, "orchestrator": ORCHESTRATORS, "gateway": GATEWAYS,
                   "relay": RELAYS}

    async def lookup(topic: str) -> list[Any]:
        try:
            return await swarm.lookup_all(topic, LOOKUP_TIMEOUT)
        except Exception:  # one topic that fails to look up leaves the others
            return []

    results = await asyncio.gather(*(lookup(t) for t in role_topics.values()))
    announced: dict[bytes, dict[str, Any]] = {}
    workers: dict[bytes, dict[str, Any]] = {}
    for role, recs in zip(role_topics, results, strict=True):
        for rec in recs:
            n = announced.setdefault(rec.public_key, {"roles": set(), "expires": 0.0})
            n["roles"].add(role)
            n["expires"] = max(n["expires"], rec.expiry)
            if role == "worker":
                workers[rec.public_key] = rec.payload if isinstance(rec.payload, dict) else {}

    me = swarm.public_key
    now = time.time()
    paths = {pk: path_of(peer) for pk, peer, _topics, _inbound in swarm.peers()}

    async def ask(pk: bytes) -> None:
        try:
            async with asyncio.timeout(INFO_TIMEOUT):
                doc = await swarm.request(pk, "node.info", None, INFO_TIMEOUT)
            infos[pk] = {**(doc if isinstance(doc, dict) else {}), "up": True, "last_seen": now}
        except Exception as e:
            old = infos.get(pk, {})
            infos[pk] = {**old, "up": False, "error": f"{type(e).__name__}: {getattr(e, 'message', e)}"[:200]}

    keys = [pk for pk in announced if pk != me][:MAX_NODES]
    await asyncio.gather(*(ask(pk) for pk in keys))
    infos[me] = {**own, "up": True, "last_seen": now}
    for pk in list(infos):  # forget keys that stopped announcing long ago
        if pk != me and pk not in announced and now - infos[pk].get("last_seen", now) > 600:
            del infos[pk]

    nodes = []
    for pk in sorted(set(announced) | set(infos) | {me}):
        info = infos.get(pk, {})
        ann = announced.get(pk, {"roles": set(), "expires": None})
        nodes.append({
            "public_key": pk.hex(),
            "roles": sorted(set(info.get("roles") or []) | ann["roles"]),
            "nat": info.get("nat"),
            "path": "self" if pk == me else paths.get(pk, "not connected"),
            "version": info.get("version"),
            "uptime_s": info.get("uptime_s"),
            "last_seen": info.get("last_seen"),
            "up": bool(info.get("up")) and (pk == me or pk in announced),
            "announced": pk in announced,
            "record_expires_in": None if not ann["expires"] else round(ann["expires"] - now, 1),
            "error": info.get("error"),
        })

    # what the router knows of each worker's health (ejected, failures), when the backend routes
    health_of = getattr(backend, "worker_health", None)
    health: dict[str, Any] = health_of() if callable(health_of) else {}
    worker_rows = []
    for pk, payload in sorted(workers.items()):
        load = payload.get("load") if isinstance(payload.get("load"), dict) else {}
        info = infos.get(pk, {})
        worker_rows.append({
            "public_key": pk.hex(),
            "state": payload.get("state"),
            "models": payload.get("models") or [],
            "queue": load.get("queue"),
            "in_flight": load.get("in_flight"),
            "ewma_ms": load.get("ewma_ms"),
            "rps": load.get("rps"),
            "health": health.get(pk.hex()),
            "up": bool(info.get("up", pk == me)),
        })

    models: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT * 2):
            listed = await backend.list_models() if backend is not None else []
    except Exception as e:
        listed = []
        models.append({"error": f"listing models failed: {getattr(e, 'message', e)}"})
    names = sorted({m.name for m in listed})
    holders = await asyncio.gather(*(lookup(model_topic(n)) for n in names[:MAX_MODEL_LOOKUPS]))
    stored = {n: sorted(r.public_key.hex() for r in recs) for n, recs in zip(names, holders, strict=False)}
    for name in names:
        versions = sort_versions({v for m in listed if m.name == name for v in ([m.version, *m.versions])})
        models.append({
            "name": name,
            "versions": versions,
            "loaded_on": sorted(r["public_key"] for r in worker_rows if name in r["models"]),
            "stored_on": stored.get(name, []),
        })
    return {"nodes": nodes, "workers": worker_rows, "models": models}


__all__ = ["CSP", "Dashboard", "Traffic", "collect_swarm"]
