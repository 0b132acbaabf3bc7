"""`swarmd model push|ls|show|pull|rm`: manage models held by the swarm's stores.

A store is reached with `--store HOST:PORT [--store-key HEX]`, or through the
local daemon of `--data-dir` when it runs the store role, or through the swarm
(`--bootstrap`, or the --data-dir node's DHT). Everything goes through the client
library (swarmd_rpc.Client.models), so the CLI and a program behave alike: push
goes to one store (replication spreads it), ls merges every store's catalog,
pull and show ask any store that holds the model (pull moves on to the next
store when a copy is corrupt or gone), rm deletes on every store that holds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from swarmd.commands.reach import local_node, operator_identity, swarm_client
from swarmd.errors import ERR_BAD_REQUEST, ERR_UNAVAILABLE, SwarmdError
from swarmd.node.address import parse_hostport
from swarmd.store.transfer import parse_ref

NAME = "model"
HELP = "push, list, show, pull and remove models held by the stores"

FLAGS = ("data_dir", "bootstrap", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
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
    p.add_argument("--version", default=None,
                   help="default: one more than the highest major version number the name ever had (so the push "
                        "becomes the latest); bytes already stored under a live version of NAME keep that version")
    p.add_argument("--tag", action="append", default=[], help="repeatable")
    p.add_argument("--description", default=None)
    p = action("ls", "list models (every version)")
    p.add_argument("--name", default=None)
    p.add_argument("--tag", default=None)
    p = action("show", "print the metadata of NAME[:VERSION] (default: latest) as JSON")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p = action("pull", "download NAME[:VERSION] to a file, verified")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("-o", "--output", required=True, metavar="FILE|DIR/",
                   help="the file to write, or an existing directory (writes DIR/NAME-VERSION.onnx)")
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


def store_client(args: argparse.Namespace) -> Any:
    """A swarmd_rpc.Client of the stores this command should talk to: --store (one store), the
    --data-dir node when it runs the store role, else every store of the swarm."""
    from swarmd_rpc import Client, ClientConfig

    cfg = ClientConfig(timeout=args.timeout, lookup_timeout=args.timeout)
    from swarmd.node.identity import parse_public_key

    key = None if args.store_key is None else parse_public_key(args.store_key, "--store-key")
    # the operator's key when this data dir has one (stores record it as the uploader and their
    # firewall may admit it); through the swarm a throwaway key (see Client.from_settings)
    if args.store is not None:
        host, port = parse_hostport(args.store, what="--store")
        return Client.for_peer(key, host, port, identity=operator_identity(args), config=cfg)
    local = local_node(args)
    if local is not None and "store" in local.roles:
        return Client.for_peer(local.public_key, local.host, local.rpc_port, identity=operator_identity(args),
                               config=cfg)
    if not args.settings.node.bootstrap and local is None:
        raise SwarmdError(
            ERR_UNAVAILABLE,
            "no store to talk to: pass --store HOST:PORT [--store-key HEX], --bootstrap HOST:PORT to find "
            "stores on the swarm, or --data-dir of a running node",
        )
    return swarm_client(args, cfg)


# -- actions ----------------------------------------------------------------------


def _bar(args: argparse.Namespace, label: str) -> Bar:
    enabled = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    return Bar(label, enabled)


def warn_non_tensor_outputs(meta: dict[str, Any]) -> None:
    """Say so when a model has outputs that are not tensors (skl2onnx's default ZipMap)."""
    odd = [o.get("name") for o in meta.get("outputs") or [] if isinstance(o, dict) and o.get("dtype") == "object"]
    if odd:
        print(
            f"swarmd: warning: output(s) {', '.join(map(str, odd))} of {meta.get('name')} are not tensors (a sequence "
            "of maps, like the ZipMap skl2onnx adds to classifiers by default). They are served as JSON: "
            "objects on /api/v1, BYTES holding JSON text on /v2. For a plain probability tensor, export with "
            "skl2onnx.to_onnx(clf, X, options={id(clf): {'zipmap': False}}) (or convert_sklearn(..., "
            "options={id(clf): {'zipmap': False}})).",
            file=sys.stderr,
        )


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
        async with store_client(args) as client:
            meta = await client.models.push(args.file, args.name, args.version, tags=args.tag,
                                            description=args.description, progress=_bar(args, "push"), timeout=t)
        if args.json:
            print(json.dumps(meta, indent=2))
        else:
            print(f"{meta['name']}:{meta['version']} {meta['digest']} {_human(meta['size'])}")
        warn_non_tensor_outputs(meta)
        return 0
    if cmd == "ls":
        async with store_client(args) as client:
            rows = await client.models.list(args.name, args.tag)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'NAME':24} {'VERSION':10} {'SIZE':>10}  {'DIGEST':12}  {'CREATED':19}  TAGS")
        for m in rows:
            created = datetime.fromtimestamp(m["created"], UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{m['name']:24} {m['version']:10} {_human(m['size']):>10}  {m['digest'][:12]}  {created}  "
                  f"{','.join(m['tags'])}")
        if not rows:
            print("(no models)")
        return 0
    name, version = parse_ref(args.ref)
    if cmd == "show":
        async with store_client(args) as client:
            meta = await client.models.get(name, version)
        print(json.dumps(meta, indent=2))
        return 0
    if cmd == "pull":
        async with store_client(args) as client:
            meta = await client.models.pull(name, version, args.output, progress=_bar(args, "pull"), timeout=t)
        if args.json:
            print(json.dumps(meta, indent=2))
        else:
            print(f"{meta['name']}:{meta['version']} -> {meta['path']} ({_human(meta['size'])}, sha256 verified)")
        return 0
    if cmd == "rm":
        if version is None:
            raise SwarmdError(ERR_BAD_REQUEST, "rm needs NAME:VERSION (versions are deleted one at a time)")
        async with store_client(args) as client:
            deleted = await client.models.rm(name, version)
        if args.json:
            print(json.dumps({"deleted": f"{name}:{version}", "stores": deleted}))
        else:
            print(f"deleted {name}:{version} on {deleted} store{'s' if deleted != 1 else ''}")
        return 0
    raise SwarmdError(ERR_BAD_REQUEST, f"unknown model action {cmd!r}")
