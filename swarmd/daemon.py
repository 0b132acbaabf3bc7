"""The composition root: a Node owns its parts and runs their lifecycle.

Start order: data dir (created, then locked: one daemon per data dir) ->
start-up checks (ports, config, files: Role.preflight; no side effects) ->
identity -> RPC server -> DHT -> swarm -> roles (in ROLE_ORDER) -> status
file -> one "ready" log line. So a check that can fail fails before a key is
created or anything is announced. Stop runs in reverse and is bounded by
node.stop_timeout. A crashed background task stops the node with a non-zero
exit status and a logged reason; any start-up failure exits 1 with one line,
and SIGINT/SIGTERM during the start abandons it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd import __version__
from swarmd.errors import ConfigError, SwarmdError
from swarmd.node.address import parse_hostport
from swarmd.node.datadir import DataDirLock
from swarmd.node.identity import Identity
from swarmd.node.statusfile import FILE_NAME, write_status_file
from swarmd.node.supervisor import Supervisor
from swarmd.roles.base import ROLE_ORDER, NodeContext, Role, check_can_listen
from swarmd.settings import Settings

EXIT_OK = 0
EXIT_CRASH = 70  # EX_SOFTWARE: a background task failed
EXIT_START_FAILED = 1


def role_class(name: str) -> type[Role]:
    """The Role subclass for a role name (swarmd.roles.<name>.ROLE)."""
    module = importlib.import_module(f"swarmd.roles.{name}")
    return module.ROLE


def ensure_data_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"data dir {path} cannot be created or written: {e.strerror}") from None
    return path


def load_instance_id(data_dir: Path) -> str:
    """A stable id for this installation, kept across restarts."""
    path = data_dir / "instance_id"
    try:
        text = path.read_text().strip()
        uuid.UUID(text)
        return text
    except (OSError, ValueError):
        pass
    iid = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(iid + "\n")
    os.replace(tmp, path)
    return iid


class Node:
    def __init__(self, settings: Settings, role_classes: dict[str, type[Role]] | None = None) -> None:
        self.settings = settings
        self._role_classes = role_classes or {}
        self.exit_code = EXIT_OK
        self._stop_requested = asyncio.Event()
        self._started: list[tuple[str, Any]] = []  # (name, stop coroutine function), in start order
        self.ctx: NodeContext | None = None
        self.lock: DataDirLock | None = None
        self.log = logger

    # -- lifecycle -----------------------------------------------------------

    def request_stop(self, exit_code: int | None = None) -> None:
        if exit_code is not None and self.exit_code == EXIT_OK:
            self.exit_code = exit_code
        self._stop_requested.set()

    def _on_crash(self, task_name: str, exc: BaseException) -> None:
        self.log.bind(event="crash", task=task_name).error(
            "stopping the node: background task {} failed: {!r}", task_name, exc
        )
        self.request_stop(EXIT_CRASH)

    def preflight(self, roles: tuple[str, ...], data_dir: Path) -> None:
        """Every start-up check that can fail, before any side effect (keys, announces)."""
        cfg = self.settings.node
        check_can_listen(cfg.host, cfg.port)
        check_can_listen(cfg.host, cfg.dht_port, udp=True, what="cannot listen for the DHT on UDP ")
        from swarmd.dht.part import dht_config_from

        dht_config_from(self.settings).validate()
        for name in roles:
            (self._role_classes.get(name) or role_class(name)).preflight(self.settings, data_dir)

    async def start(self) -> NodeContext:
        cfg = self.settings.node
        data_dir = ensure_data_dir(Path(cfg.data_dir))
        self.lock = DataDirLock.acquire(data_dir)
        roles = tuple(r for r in ROLE_ORDER if r in cfg.roles)
        try:
            self.preflight(roles, data_dir)
            identity = Identity.load_or_create(data_dir / "identity.key")
        except BaseException:
            self.lock.release()
            raise
        self.log = logger.bind(node=identity.public_hex[:16])
        ctx = NodeContext(
            identity=identity,
            settings=self.settings,
            data_dir=data_dir,
            instance_id=load_instance_id(data_dir),
            roles=roles,
            tasks=Supervisor(on_crash=self._on_crash),
        )
        self.ctx = ctx
        try:
            if self.settings.tracing.enabled:
                from swarmd.node import tracing

                tracing.start(self.settings.tracing, instance=identity.public_hex)
                self._started.append(("tracing", _stop_tracing))
            for name, part in self._parts(ctx):
                await part.start()
                self._started.append((name, part.stop))
                if name == "rpc":
                    ctx.methods.register("node.info", self._node_info, op="r", inline=True)
            for name in roles:
                role = (self._role_classes.get(name) or role_class(name))(ctx)
                ctx._roles[name] = role
                await role.start()
                self._started.append((f"role:{name}", role.stop))
            await self._serve_metrics(ctx)
        except BaseException:
            await self._stop_within(self.settings.node.stop_timeout)
            raise
        self.write_status()
        self.log.bind(
            event="ready",
            public_key=identity.public_hex,
            roles=list(roles),
            ports=ctx.ports,
            pid=os.getpid(),
            version=__version__,
        ).info("ready")
        return ctx

    def _parts(self, ctx: NodeContext) -> list[tuple[str, Any]]:
        """The network parts every node runs before its roles, in start order.

        Each is an object with async start()/stop() that fills its slots on ctx
        (rpc_server; dht and swarm, built by swarmd.swarm.stack.open_stack) and
        its ports in ctx.ports.
        """
        from swarmd.rpc.part import RpcPart
        from swarmd.swarm.part import StackPart

        return [("rpc", RpcPart(ctx)), ("stack", StackPart(ctx))]

    async def stop(self) -> None:
        while self._started:
            name, stop = self._started.pop()
            try:
                await stop()
            except Exception as e:  # keep stopping the rest; a failed stop is logged, not fatal
                self.log.opt(exception=e).bind(event="stop_failed", part=name).error(
                    "stopping {} failed", name
                )
        if self.ctx is not None:
            await self.ctx.tasks.close()
            self._remove_status()
        if self.lock is not None:
            self.lock.release()

    async def _stop_within(self, seconds: float) -> bool:
        """stop(), bounded; False (logged) when it overran."""
        try:
            async with asyncio.timeout(seconds):
                await self.stop()
            return True
        except TimeoutError:
            self.log.bind(event="stop_timeout").error("graceful stop took longer than {}s; exiting anyway", seconds)
            if self.lock is not None:
                self.lock.release()
            return False

    def _remove_status(self) -> None:
        """Delete status.json only if this process wrote it (it names our pid)."""
        assert self.ctx is not None
        status = self.ctx.data_dir / FILE_NAME
        try:
            if json.loads(status.read_text()).get("pid") != os.getpid():
                return
        except (OSError, ValueError, AttributeError):
            return
        with contextlib.suppress(OSError):
            status.unlink()

    async def _serve_metrics(self, ctx: NodeContext) -> None:
        """Every role's metrics and the swarm's, on node.metrics when it is set."""
        ctx.metrics.add("swarm", lambda: _swarm_metrics(ctx))
        for name, role in ctx._roles.items():
            ctx.metrics.add(f"role:{name}", role.metrics)
        if self.settings.node.metrics:
            host, port = parse_hostport(self.settings.node.metrics, what="node.metrics", listen=True)
            ctx.ports["metrics"] = await ctx.metrics.start(host, port)
            self._started.append(("metrics", ctx.metrics.stop))

    async def _node_info(self, call: Any, params: Any) -> dict[str, Any]:
        assert self.ctx is not None
        return self.ctx.info()

    def write_status(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        doc = {
            "public_key": ctx.identity.public_hex,
            "instance_id": ctx.instance_id,
            "roles": list(ctx.roles),
            "host": self.settings.node.host,  # what the RPC server bound; tools dial it (node/statusfile.py)
            "ports": ctx.ports,
            "pid": os.getpid(),
            "version": __version__,
        }
        write_status_file(ctx.data_dir, doc)

    async def run(self) -> int:
        """Start, serve until SIGINT/SIGTERM or a crash, stop within a bounded time."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            starting = asyncio.ensure_future(self.start())
            stop_wait = asyncio.ensure_future(self._stop_requested.wait())
            try:
                await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
            if not starting.done():  # SIGINT/SIGTERM while starting (e.g. waiting for a bootstrap)
                self.log.bind(event="start_abandoned").warning("stop requested during start; stopping")
                starting.cancel()  # start() stops what it started, bounded by stop_timeout
                await asyncio.wait({starting}, timeout=self.settings.node.stop_timeout + 1.0)
                self.log.bind(event="stopped", exit_code=self.exit_code).info("stopped")
                return self.exit_code
            exc = starting.exception()
            if exc is not None:
                if isinstance(exc, SwarmdError):
                    self.log.bind(event="start_failed", code=exc.code).error("start failed: {}", exc.message)
                else:  # a bug or an unexpected OS error: still one line, never a hang
                    self.log.bind(event="start_failed", code="ERR_INTERNAL").error(
                        "start failed: {}: {}", type(exc).__name__, exc
                    )
                return EXIT_START_FAILED
            await self._stop_requested.wait()
            self.log.bind(event="stopping").info("stopping")
            t0 = loop.time()
            if not await self._stop_within(self.settings.node.stop_timeout):
                self.exit_code = self.exit_code or EXIT_CRASH
            self.log.bind(event="stopped", exit_code=self.exit_code, seconds=round(loop.time() - t0, 3)).info(
                "stopped"
            )
            return self.exit_code
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


async def _stop_tracing() -> None:
    """Export the spans still buffered, then stop tracing (last, after every role stopped)."""
    from swarmd.node import tracing

    await asyncio.to_thread(tracing.stop)


def _swarm_metrics(ctx: NodeContext) -> list[Any]:
    """Connections by path and DHT records held: what every node has."""
    from prometheus_client.core import GaugeMetricFamily

    out = []
    swarm = ctx.swarm
    if swarm is not None:
        from swarmd.swarm.paths import path_of

        by_path: dict[str, int] = {}
        for _pk, peer, _topics, _inbound in swarm.peers():
            p = path_of(peer)
            by_path[p] = by_path.get(p, 0) + 1
        g = GaugeMetricFamily("swarmd_connections", "open peer connections by path", labels=["path"])
        for p, n in sorted(by_path.items()):
            g.add_metric([p], n)
        out.append(g)
    if ctx.dht is not None and getattr(ctx.dht, "protocol", None) is not None:
        out.append(GaugeMetricFamily("swarmd_dht_records", "topic records this DHT node holds",
                                     value=len(ctx.dht.protocol.records)))
    out.append(GaugeMetricFamily("swarmd_uptime_seconds", "seconds since the node started",
                                 value=ctx.info()["uptime_s"]))
    return out
