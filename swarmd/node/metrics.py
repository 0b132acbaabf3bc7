"""Prometheus metrics of any node: `--metrics HOST:PORT` (node.metrics) serves GET /metrics.

Every part of the node contributes at scrape time, so nothing is counted twice and nothing
runs between scrapes: the daemon registers one collector for its swarm (connections by path,
DHT records held) and one per role (a role's `metrics()`: the worker's Triton-named
`nv_inference_*` counters, the store's bytes, the relay's bytes and circuits). Text another
exporter already renders (the gateway's own registry, also served on its HTTP /metrics) is
appended as it is. prometheus_client is imported only by a node that serves metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from loguru import logger

from swarmd.errors import SwarmdError

MetricsFn = Callable[[], Iterable[Any]]  # yields prometheus_client metric families
TextFn = Callable[[], bytes]  # Prometheus text exposition lines rendered elsewhere


class _Collector:
    def __init__(self, name: str, fn: MetricsFn) -> None:
        self.name, self.fn = name, fn

    def collect(self) -> Iterable[Any]:
        try:
            yield from self.fn()
        except Exception as e:  # one part that fails must not blank the whole scrape
            logger.bind(event="metrics_collect_failed", part=self.name).warning("metrics of {} failed: {!r}", self.name, e)


class NodeMetrics:
    """The collectors of one node and, when asked, the HTTP listener that serves them."""

    def __init__(self) -> None:
        self._fns: list[tuple[str, MetricsFn]] = []
        self._texts: list[TextFn] = []
        self._runner: Any = None
        self.port = 0

    def add(self, name: str, fn: MetricsFn) -> None:
        self._fns.append((name, fn))

    def add_text(self, fn: TextFn) -> None:
        self._texts.append(fn)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        for name, fn in self._fns:
            registry.register(_Collector(name, fn))
        return generate_latest(registry) + b"".join(t() for t in self._texts)

    async def start(self, host: str, port: int) -> int:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise SwarmdError("ERR_CONFIG", f"metrics cannot listen on {host}:{port}: {e.strerror}") from None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


__all__ = ["NodeMetrics"]
