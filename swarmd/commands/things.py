"""`swarmd things`: read a node's thing services from its data dir, no network.

For the operator on the box, when the node is stopped or unreachable: the
databases are SQLite in WAL mode, so reading them while the node runs is
safe. Live calls go through `swarmd call KEY listThings ...` instead.

    swarmd things services
    swarmd things list books --query '{"info.title": {"$contains": "dune"}}' --limit 5
    swarmd things tail books --id dune --limit 3
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, SwarmdError
from swarmd.services.query import apply_sort, compile_projection, compile_query, compile_sort
from swarmd.services.snaplog import SnapLog, SnapLogConfig
from swarmd.services.thing_store import ThingStore

NAME = "things"
HELP = "list the things and snapshot logs a node keeps under its data dir (offline, read-only)"
FLAGS = ("data_dir", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="things_command", metavar="ACTION", required=True,
                                parser_class=type(parser))
    sub.add_parser("services", help="the thing services found in the data dir (--json: one array)")
    ls = sub.add_parser("list", help="things of one service, as listThings would return them")
    ls.add_argument("service")
    ls.add_argument("--query", default=None, help="JSON query, e.g. '{\"info.shelf\": 3}'")
    ls.add_argument("--fields", default=None, help="JSON projection, e.g. '{\"info.title\": 1}'")
    ls.add_argument("--sort", default=None, help="JSON sort, e.g. '{\"created\": -1}'")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--opts", action="store_true", help="show private opts too")
    tl = sub.add_parser("tail", help="newest snapshot log entries of one service")
    tl.add_argument("service")
    tl.add_argument("--id", default=None, help="only this thing")
    tl.add_argument("--limit", type=int, default=20)


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise SwarmdError(ERR_BAD_REQUEST, f"--{what} is not valid JSON: {e}") from None


def _service_dir(data_dir: Path, service: str) -> Path:
    d = data_dir / "things" / service
    if not (d / "things.sqlite").exists():
        raise SwarmdError(ERR_NOT_FOUND, f"no thing service {service!r} under {data_dir / 'things'}")
    return d


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.settings.node.data_dir)
    if args.things_command == "services":
        root = data_dir / "things"
        names = sorted(p.name for p in root.iterdir() if (p / "things.sqlite").exists()) if root.is_dir() else []
        if args.json:
            print(json.dumps(names))
            return 0
        for n in names:
            print(n)
        if not names:
            print(f"(no thing services under {root})")
        return 0
    d = _service_dir(data_dir, args.service)
    if args.things_command == "tail":
        log = SnapLog(d / "log", "snap", SnapLogConfig())
        entries = log.tail(max(0, args.limit), match=(lambda e: e.get("id") == args.id) if args.id else None)
        _print_rows(list(entries), args.json)
        return 0
    try:
        pred = compile_query(_json_arg(args.query, "query") or {})
        project = compile_projection(_json_arg(args.fields, "fields"))
        sort = compile_sort(_json_arg(args.sort, "sort"))
    except ValueError as e:
        raise SwarmdError(ERR_BAD_REQUEST, str(e)) from None
    try:
        store = ThingStore(d / "things.sqlite")
    except sqlite3.Error as e:
        raise SwarmdError(ERR_NOT_FOUND, f"cannot open {d / 'things.sqlite'}: {e}") from None
    try:
        rows = store.load_all()
    finally:
        store.close()
    views = []
    for r in rows:
        v: dict[str, Any] = {"id": r.id, "type": r.type, "tags": r.tags, "info": r.info, "rev": r.rev,
                             "created": r.created, "updated": r.updated}
        if args.opts:
            v["opts"] = r.opts
        if pred(v):
            views.append(v)
    if sort:
        views = list(apply_sort(views, sort))
    _print_rows([project(v) if project else v for v in views[: max(0, args.limit)]], args.json)
    return 0


def _print_rows(rows: list[Any], as_array: bool) -> None:
    """JSON lines by default (greppable, streamable); --json: one array (for jq and programs)."""
    if as_array:
        print(json.dumps(rows))
        return
    for r in rows:
        print(json.dumps(r))
