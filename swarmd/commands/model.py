"""`swarmd model push|ls|show|pull|rm`: manage models held by the swarm's stores.

A store is reached with `--store HOST:PORT [--store-key HEX]`, or through the
local daemon of `--data-dir` when it runs the store role, or through the swarm
(`--bootstrap`): push goes to one store (replication spreads it), ls merges
every store's catalog, pull and show ask any store that holds the model, rm
deletes on every store that holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_CORRUPT,
    ERR_NOT_FOUND,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.node.deadline import within
from swarmd.settings import parse_hostport
from swarmd.store.transfer import parse_ref, pull_file, push_file

NAME = "model"
HELP = "push, list, show, pull and remove models held by the stores"

COMMON_DESTS = ("config", "env", "bootstrap", "data_dir", "log_level", "log_format")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from swarmd.cli import add_common_flags

    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # common flags after the action too (`swarmd model ls --data-dir X`), without
        # overwriting ones given before it
        add_common_flags(sp, daemon=False)
        for a in sp._actions:
            if a.dest in COMMON_DESTS:
                a.default = argparse.SUPPRESS
        g = sp.add_argument_group("reaching a store")
        g.add_argument("--store", metavar="HOST:PORT", help="talk to this store directly")
        g.add_argument("--store-key", metavar="HEX", help="the store's public key (authenticates it)")
        g.add_argument("--timeout", type=float, default=30.0, help="seconds per network step (default 30)")
        g.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                       help="progress bar on stderr (auto: when stderr is a terminal)")
        return sp

    p = action("push", "upload an ONNX file as NAME[:VERSION]")
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--version", default=None, help="default: one more than the highest numbered version")
    p.add_argument("--tag", action="append", default=[], help="repeatable")
    p.add_argument("--description", default=None)
    p.add_argument("--json", action="store_true", help="print the stored metadata as JSON")
    p = action("ls", "list models (every version)")
    p.add_argument("--name", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--json", action="store_true")
    p = action("show", "print the metadata of NAME[:VERSION] (default: latest) as JSON")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p = action("pull", "download NAME[:VERSION] to a file, verified")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = action("rm", "delete NAME:VERSION from every store that holds it")
    p.add_argument("ref", metavar="NAME:VERSION")


class Bar:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        frac = done / total if total else 1.0
        rate = done / max(now - self.start, 1e-6) / 2**20
        fill = int(frac * 30)
        sys.stderr.write(
            f"\r{self.label} [{'#' * fill}{'-' * (30 - fill)}] {frac * 100:5.1f}% "
            f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB {rate:.1f} MiB/s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# -- reaching stores ------------------------------------------------------------


@contextlib.asynccontextmanager
async def stores(
    args: argparse.Namespace, *, topic: str | None = None, first_only: bool = False
) -> AsyncIterator[list[Any]]:
    """Connected peers of the stores this command should talk to (at least one)."""
    from swarmd.node.identity import Identity
    from swarmd.rpc import connect

    node = args.settings.node
    key: bytes | None = None
    if args.store_key is not None:
        try:
            key = bytes.fromhex(args.store_key)
            if len(key) != 32:
                raise ValueError
        except ValueError:
            raise SwarmdError(ERR_BAD_REQUEST, "--store-key must be 64 hex characters (an Ed25519 public key)") from None
    targets: list[tuple[str, int, bytes | None]] = []
    if args.store is not None:
        host, port = parse_hostport(args.store, what="--store")
        targets.append((host, port, key))
    else:
        local = _local_store(Path(node.data_dir))
        if local is not None:
            targets.append(local)
    if not targets:
        async with _swarm_stores(args, topic, first_only) as peers:
            yield peers
        return
    # the operator's key when this data dir has one (stores record it as the uploader and
    # their firewall may admit it), else a throwaway key
    key_file = Path(node.data_dir) / "identity.key"
    ident = Identity.load_or_create(key_file) if key_file.exists() else Identity.generate()
    peers = []
    try:
        for host, port, pk in targets:
            try:
                peers.append(await connect(ident, host, port, remote_public_key=pk, timeout=args.timeout))
            except (OSError, TimeoutError) as e:
                raise SwarmdError(ERR_UNAVAILABLE, f"cannot reach store at {host}:{port}: {e}") from None
        yield peers
    finally:
        for p in peers:
            with contextlib.suppress(Exception):
                await p.close()


def _local_store(data_dir: Path) -> tuple[str, int, bytes | None] | None:
    """The daemon of this data dir, when it runs the store role (from its status.json)."""
    try:
        doc = json.loads((data_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or "store" not in (doc.get("roles") or []):
        return None
    ports = doc.get("ports") or {}
    port = next((ports[k] for k in ("rpc", "tcp", "port") if isinstance(ports.get(k), int)), None)
    if port is None:
        return None
    try:
        key = bytes.fromhex(doc.get("public_key", ""))
    except ValueError:
        key = b""
    return "127.0.0.1", port, key if len(key) == 32 else None


@contextlib.asynccontextmanager
async def _swarm_stores(
    args: argparse.Namespace, topic: str | None, first_only: bool = False
) -> AsyncIterator[list[Any]]:
    """Stores found through the swarm (announcing `topic`, default STORES), with the client
    library's short-lived client-mode DHT node and swarm (an ephemeral key; it announces nothing).
    Lookup results are taken as they stream in: the first one (push), or all that arrive until
    the crawl ends or 1 s after the first (an unresponsive DHT node costs its full timeout, and
    a user waits on this)."""
    from swarmd.topics import STORES
    from swarmd_rpc import Client, ClientConfig

    settings = args.settings
    if not settings.node.bootstrap:
        raise SwarmdError(
            ERR_UNAVAILABLE,
            "no store to talk to: pass --store HOST:PORT [--store-key HEX], --bootstrap HOST:PORT to find "
            "stores on the swarm, or --data-dir of a node running the store role",
        )
    cfg = ClientConfig(timeout=args.timeout, lookup_timeout=args.timeout)
    async with Client.from_settings(settings, config=cfg) as client:
        records = await client.lookup(topic or STORES, first_only=first_only, settle=1.0)
        if not records:
            raise SwarmdError(ERR_UNAVAILABLE, f"no store announces {topic or STORES!r} in the swarm")
        peers = []
        for rec in records:
            try:
                peers.append(await within(client.connect(rec.public_key), args.timeout))
            except (SwarmdError, OSError, TimeoutError):
                continue  # a store that went away: its record lingers until it expires
        if not peers:
            raise SwarmdError(ERR_UNAVAILABLE, f"none of the {len(records)} stores found in the swarm answered")
        yield peers


# -- actions ----------------------------------------------------------------------


def _bar(args: argparse.Namespace, label: str) -> Bar:
    enabled = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    return Bar(label, enabled)


async def _first(peers: list[Any], method: str, params: dict[str, Any], timeout: float) -> tuple[Any, Any]:
    """(peer, result) of the first store that answers without ERR_NOT_FOUND."""
    last: SwarmdError | None = None
    for p in peers:
        try:
            return p, await p.call(method, params, timeout=timeout)
        except SwarmdError as e:
            last = e
            if e.code not in (ERR_NOT_FOUND, ERR_UNAVAILABLE):
                raise
    raise last or SwarmdError(ERR_NOT_FOUND, "no store answered")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


async def run(args: argparse.Namespace) -> int:
    cmd = args.model_command
    t = args.timeout
    if cmd == "push":
        if not args.file.is_file():
            raise SwarmdError(ERR_BAD_REQUEST, f"{args.file} is not a readable file")
        async with stores(args, first_only=True) as peers:
            meta = await push_file(peers[0], args.file, args.name, args.version, tags=args.tag,
                                   description=args.description, progress=_bar(args, "push"), timeout=t)
        if args.json:
            print(json.dumps(meta, indent=2))
        else:
            print(f"{meta['name']}:{meta['version']} {meta['digest']} {_human(meta['size'])}")
        return 0
    if cmd == "ls":
        params = {k: v for k, v in (("name", args.name), ("tag", args.tag)) if v is not None}
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        async with stores(args) as peers:
            for p in peers:
                for m in (await p.call("listModels", params, timeout=t))["models"]:
                    seen.setdefault((m["name"], m["version"]), m)
        rows = [seen[k] for k in sorted(seen)]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'NAME':24} {'VERSION':10} {'SIZE':>10}  {'DIGEST':12}  {'CREATED':19}  TAGS")
        for m in rows:
            created = datetime.fromtimestamp(m["created"], UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{m['name']:24} {m['version']:10} {_human(m['size']):>10}  {m['digest'][:12]}  {created}  "
                  f"{','.join(m['tags'])}")
        return 0
    name, version = parse_ref(args.ref)
    from swarmd.topics import model_topic

    params = {"name": name} if version is None else {"name": name, "version": version}
    if cmd == "show":
        async with stores(args, topic=model_topic(name)) as peers:
            _, meta = await _first(peers, "getModel", params, t)
        print(json.dumps(meta, indent=2))
        return 0
    if cmd == "pull":
        async with stores(args, topic=model_topic(name)) as peers:
            peer, meta = await _first(peers, "getModel", params, t)
            # the store that answered first, then the others: a corrupt or vanished copy is not the end
            for i, p in enumerate([peer] + [q for q in peers if q is not peer]):
                try:
                    await pull_file(p, meta["digest"], args.output, size=meta["size"], progress=_bar(args, "pull"),
                                    timeout=t)
                    break
                except SwarmdError as e:
                    if e.code not in (ERR_CORRUPT, ERR_CLOSED, ERR_NOT_FOUND, ERR_TIMEOUT) or i == len(peers) - 1:
                        raise
                    print(f"swarmd: {e.code} from one store, trying another", file=sys.stderr)
        print(f"{meta['name']}:{meta['version']} -> {args.output} ({_human(meta['size'])}, sha256 verified)")
        return 0
    if cmd == "rm":
        if version is None:
            raise SwarmdError(ERR_BAD_REQUEST, "rm needs NAME:VERSION (versions are deleted one at a time)")
        deleted = 0
        async with stores(args, topic=model_topic(name)) as peers:
            for p in peers:
                try:
                    await p.call("deleteModel", params, timeout=t)
                    deleted += 1
                except SwarmdError as e:
                    if e.code != ERR_NOT_FOUND:
                        raise
        if not deleted:
            raise SwarmdError(ERR_NOT_FOUND, f"no store holds {name}:{version}")
        print(f"deleted {name}:{version} on {deleted} store{'s' if deleted != 1 else ''}")
        return 0
    raise SwarmdError(ERR_BAD_REQUEST, f"unknown model action {cmd!r}")
