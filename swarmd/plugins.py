"""Run a thing service (or an ork) as a plugin worker on a swarmd node.

A plugin worker is a swarmd node (same identity, data dir, config layers,
RPC server, DHT node and swarm, ready line, status file and signal handling
as `swarmd --role ...`) with one extra part: a thing service mounted on the node's RPC methods and, when
the node runs a swarm, announced on the RACKS topic so orks find it. An
author's whole program is the subclass and one line::

    if __name__ == "__main__":
        sys.exit(run_thing_worker(Books, name="books", rack_type="book"))

and `python -m swarmd.plugins ork --data-dir D` runs an ork the same way.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from swarmd.cli import Parser, UsageError, add_common_flags, settings_from_args
from swarmd.daemon import Node
from swarmd.errors import SwarmdError
from swarmd.roles.base import NodeContext
from swarmd.services.ork import Ork, OrkConfig, RpcRackCaller, SwarmRackCaller, rack_payload
from swarmd.services.things import ThingsConfig, ThingService
from swarmd.topics import RACKS


@dataclass
class PluginOptions:
    rack_id: str | None = None  # the id orks list this rack under (default: the service name)
    rack_type: str = ""
    snapshot_interval_s: float | None = None
    announce: bool = True


class ThingPart:
    """A node part: start the service, mount it, announce it; stop in reverse."""

    def __init__(self, ctx: NodeContext, service: ThingService, options: PluginOptions) -> None:
        self.ctx = ctx
        self.service = service
        self.options = options
        self._mounted: list[str] = []
        self._announced = False

    async def start(self) -> None:
        await self.service.start(self.ctx.tasks)
        self._mounted = self.service.mount(self.ctx.methods)
        swarm = self.ctx.swarm
        if self.options.announce and swarm is not None:
            payload = rack_payload(self.options.rack_id or self.service.name, self.options.rack_type)
            await swarm.join(RACKS, announce=True, lookup=False, payload=payload)
            self._announced = True
        logger.bind(event="thing_plugin_started", service=self.service.name, methods=self._mounted).info(
            "serving thing service {}", self.service.name
        )

    async def stop(self) -> None:
        if self._announced and self.ctx.swarm is not None:
            await self.ctx.swarm.leave(RACKS)
        for name in self._mounted:
            self.ctx.methods.unregister(name)
        await self.service.stop()


class OrkPart:
    """A node part serving an ork: rack registry + fan-out over a connection pool."""

    def __init__(self, ctx: NodeContext, config: OrkConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.ork: Ork | None = None
        self._pool: Any = None
        self._mounted: list[str] = []

    async def start(self) -> None:
        from swarmd_rpc.pool import Pool

        self._pool = Pool(self.ctx.identity)
        direct = RpcRackCaller(self._pool)
        swarm = self.ctx.swarm
        if swarm is not None:
            caller: Any = SwarmRackCaller(swarm, direct)

            async def lookup() -> Any:
                return await swarm.lookup_all(RACKS, timeout=self.config.call_timeout_s)

            self.ork = Ork(self.ctx.data_dir, caller, self.config, lookup=lookup)
        else:
            self.ork = Ork(self.ctx.data_dir, direct, self.config)
        await self.ork.start(self.ctx.tasks)
        self._mounted = self.ork.mount(self.ctx.methods)

    async def stop(self) -> None:
        for name in self._mounted:
            self.ctx.methods.unregister(name)
        if self.ork is not None:
            await self.ork.stop()
        if self._pool is not None:
            await self._pool.close()


class PluginNode(Node):
    """A Node whose parts end with the plugin's part (after the network parts)."""

    def __init__(self, settings: Any, make_part: Callable[[NodeContext], Any], part_name: str) -> None:
        super().__init__(settings)
        self._make_part = make_part
        self._part_name = part_name

    def _parts(self, ctx: NodeContext) -> list[tuple[str, Any]]:
        return [*super()._parts(ctx), (self._part_name, self._make_part(ctx))]


def _parse(
    argv: list[str] | None, prog: str, extra: Callable[[argparse.ArgumentParser], None], who: str
) -> argparse.Namespace | None:
    """The flags and settings; None after printing `who: error: ...` for bad ones."""
    p = Parser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_flags(p, daemon=True)
    extra(p)
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
        args.settings = settings_from_args(args, dict(os.environ))
    except (UsageError, SwarmdError) as e:
        print(f"{who}: error: {getattr(e, 'message', e)}", file=sys.stderr)
        return None
    return args


def _run(args: argparse.Namespace, make_part: Callable[[NodeContext], Any], part_name: str) -> int:
    from swarmd.node.logging import setup_logging

    setup_logging(args.settings.node.log_level, args.settings.node.log_format)
    try:
        from swarmd.node.eventloop import run

        return run(PluginNode(args.settings, make_part, part_name).run(), args.settings.node.event_loop)
    except KeyboardInterrupt:
        return 130


def run_thing_worker(
    service_cls: type[ThingService], name: str, rack_type: str = "", argv: list[str] | None = None
) -> int:
    """Parse the common swarmd flags plus --rack-id/--snapshot-interval and
    serve `service_cls(name, ...)` until SIGINT/SIGTERM; returns the exit status."""

    def extra(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("thing worker")
        g.add_argument("--rack-id", default=None, help=f"id orks list this rack under (default {name})")
        g.add_argument("--snapshot-interval", type=float, default=None, help="seconds between snapshots (0: off)")
        g.add_argument("--no-announce", action="store_true", help="do not announce on the RACKS topic")

    args = _parse(argv, f"{service_cls.__name__.lower()}-worker", extra, name)
    if args is None:
        return 2
    # [things] once the integrator composes ThingsConfig into Settings; defaults until then.
    cfg = copy.copy(getattr(args.settings, "things", None) or ThingsConfig())
    if args.snapshot_interval is not None:
        cfg.snapshot_interval_s = args.snapshot_interval
    options = PluginOptions(rack_id=args.rack_id, rack_type=rack_type, announce=not args.no_announce)

    def make_part(ctx: NodeContext) -> ThingPart:
        return ThingPart(ctx, service_cls(name, ctx.data_dir, cfg), options)

    return _run(args, make_part, f"things:{name}")


def run_ork(argv: list[str] | None = None) -> int:
    """Serve an ork (registerRack, listRacks, fan-out of the thing methods)."""
    def extra(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("ork")
        g.add_argument("--discover-interval", type=float, default=None,
                       help="seconds between lookups of the RACKS topic (0: off)")
        g.add_argument("--lease", type=float, default=None, help="seconds a discovered rack lives unless seen again")

    args = _parse(argv, "swarmd-ork", extra, "ork")
    if args is None:
        return 2
    cfg = copy.copy(getattr(args.settings, "ork", None) or OrkConfig())
    if args.discover_interval is not None:
        cfg.discover_interval_s = args.discover_interval
    if args.lease is not None:
        cfg.lease_s = args.lease
    return _run(args, lambda ctx: OrkPart(ctx, cfg), "ork")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "ork":
        print("usage: python -m swarmd.plugins ork [swarmd flags]", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_ork(sys.argv[2:]))
