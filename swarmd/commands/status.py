"""`swarmd status [--json]`: what the node running on this data dir is doing.

Reads the node's status.json (key, roles, ports), asks the node over RPC for
its connections (`swarm.status`) and NAT report (`nat.status`, when the node
has traversal), and looks the swarm up from the node's own DHT port for the
workers (state and live load from their records) and the models the stores
hold. Each part that cannot be had says why instead of failing the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_UNKNOWN_METHOD, SwarmdError
from swarmd.node.statusfile import read_local_node

NAME = "status"
HELP = "the running node's roles, NAT type, peers, workers with load and models (same --data-dir)"
FLAGS = ("data_dir", "bootstrap", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per question (default 5)")


async def gather_status(settings: Any, timeout: float, host: str | None = None) -> dict[str, Any]:  # noqa: ASYNC109
    """Everything `swarmd status` prints, as one JSON-able object."""
    from swarmd.topics import WORKERS
    from swarmd_rpc import Client, ClientConfig

    local = read_local_node(Path(settings.node.data_dir), host)
    doc = local.doc
    out: dict[str, Any] = {
        "public_key": doc["public_key"],
        "roles": doc.get("roles", []),
        "ports": doc.get("ports", {}),
        "pid": doc.get("pid"),
        "version": doc.get("version"),
        "errors": {},
    }
    # a throwaway key, never the node's own: two connections under one key would be deduplicated
    # against the node's real ones by every peer that sees them
    cfg = ClientConfig(timeout=timeout, lookup_timeout=timeout)
    admission = admission_check(settings)
    async with Client.for_peer(local.public_key, local.host, local.rpc_port, config=cfg) as node:
        try:
            sw = await node.call(None, "swarm.status")
            out["dht"] = {k: sw["dht"].get(k) for k in ("address", "mode", "reflexive", "records_held")}
            out["dht"]["contacts"] = len(sw["dht"].get("contacts", []))
            out["peers"] = sw.get("peers", [])
        except SwarmdError as e:
            out["errors"]["peers"] = f"{e.code}: {e.message}"
        if "worker" in out["roles"]:
            try:  # the models this worker has loaded and the execution provider running each
                health = await node.call(None, "getHealth")
                out["providers"] = health.get("providers", {}) if isinstance(health, dict) else {}
            except SwarmdError as e:
                out["errors"]["providers"] = f"{e.code}: {e.message}"
        try:
            out["tasks"] = await node.call(None, "node.tasks")
        except SwarmdError as e:
            if e.code != ERR_UNKNOWN_METHOD:
                out["errors"]["tasks"] = f"{e.code}: {e.message}"
        try:
            nat = await node.call(None, "nat.status")
            out["nat"] = nat.get("nat", nat) if isinstance(nat, dict) else nat
            if isinstance(nat, dict) and isinstance(nat.get("metrics"), dict):
                out["paths"] = nat["metrics"]  # connections by path, upgrades, relay bytes
            if isinstance(nat, dict) and isinstance(nat.get("portmap"), dict):
                out["portmap"] = nat["portmap"]  # ports the router forwards to us (PCP / NAT-PMP / UPnP)
        except SwarmdError as e:
            out["nat"] = None
            if e.code != ERR_UNKNOWN_METHOD:
                out["errors"]["nat"] = f"{e.code}: {e.message}"
    boot = [local.dht_address] if local.dht_address else []
    boot += list(settings.node.bootstrap)
    out["workers"], out["models"] = [], []
    if not boot:
        out["errors"]["swarm"] = "the node lists no DHT port and no --bootstrap was given"
        return out
    trust = settings.trust
    if trust.operators and not trust.open:  # models and verdicts only from admitted stores and orchestrators
        cfg.operators = list(trust.operators)
    async with Client(boot, swarm_secret=settings.node.swarm_secret, config=cfg) as swarm:
        try:
            ejected, found = await asyncio.gather(  # one wait, not two
                ejections(swarm), swarm.lookup(WORKERS, admitted_only=False))  # each shown with its admission
            now = time.time()
            for rec in found:
                p = rec.payload if isinstance(rec.payload, dict) else {}
                models = [m.get("name") if isinstance(m, dict) else m for m in p.get("models") or []]
                key = rec.public_key.hex()
                out["workers"].append({"public_key": key, "state": p.get("state"),
                                       "load": p.get("load") or {}, "models": models,
                                       "addresses": [f"{h}:{pt}" for h, pt in rec.addresses],
                                       "last_seen_s": last_seen(rec.seq, now),
                                       "expires_in_s": round(max(0.0, rec.expiry - now), 1),
                                       "ejected_by": ejected.get(key[:16], []),
                                       "admission": admission(rec, "worker")})
        except SwarmdError as e:
            out["errors"]["workers"] = f"{e.code}: {e.message}"
        try:
            out["models"] = [{k: m.get(k) for k in ("name", "version", "digest", "size", "tags")}
                             for m in await swarm.models.list()]
        except SwarmdError as e:
            out["errors"]["models"] = f"{e.code}: {e.message}"
    return out


def admission_check(settings: Any) -> Callable[[Any, str | None], dict[str, Any] | None]:
    """How this config judges a record on a role's topic: {"admitted": True|False, "why": ...}
    against the operator keys of its [trust] section; {"admitted": None} (unverified) when the
    config names none, since any key can announce there; None off role topics."""
    from swarmd.node.trust import Trust, parse_key

    cfg = getattr(settings, "trust", None)
    trust: Trust | None = None
    if cfg is not None and cfg.open:
        trust = Trust.open_swarm()
    elif cfg is not None and cfg.operators:
        trust = Trust([parse_key(k, "trust.operators[]") for k in cfg.operators])

    def check(rec: Any, role: str | None) -> dict[str, Any] | None:
        if role is None:
            return None
        if trust is None:
            return {"admitted": None, "why": f"unverified: no [trust] operators in this config, so "
                                              f"any key may announce as a {role}"}
        ok, why = trust.explain_record(rec, role)
        return {"admitted": ok, "why": why}

    return check


def admission_label(adm: dict[str, Any] | None) -> str:
    """The one-word form of admission_check's verdict for text output."""
    if adm is None:
        return ""
    return {True: "admitted", False: "NOT-ADMITTED", None: "unverified"}[adm["admitted"]]


def last_seen(seq: int, now: float) -> float | None:
    """Seconds since the node signed this record (its seq is the signing time in ms,
    refreshed every few seconds by a live node); None when the seq is not a time."""
    from swarmd.orchestrator.discovery import signed_age

    age = signed_age(seq, now)
    return None if age is None else round(age, 1)


async def ejections(swarm: Any) -> dict[str, list[str]]:
    """Worker key prefix -> orchestrators (key prefixes) whose record says they ejected it."""
    from swarmd.orchestrator.discovery import ejection_verdicts
    from swarmd.topics import ORCHESTRATORS

    return ejection_verdicts(await swarm.lookup(ORCHESTRATORS))


def _print_scope(scope: dict[str, Any], indent: str) -> None:
    """One line per Supervisor scope, its children indented below it."""
    tasks = scope.get("tasks") or []
    names = ", ".join(tasks[:8]) + (f", … {len(tasks) - 8} more" if len(tasks) > 8 else "")
    print(f"{indent}{scope.get('name')} [{scope.get('policy')}]: {names or '-'}")
    for child in scope.get("scopes") or []:
        _print_scope(child, indent + "  ")


def print_status(st: dict[str, Any]) -> None:
    print(f"node     {st['public_key']}  pid {st.get('pid')}  version {st.get('version')}")
    print(f"roles    {', '.join(st['roles']) or '-'}")
    print(f"ports    {', '.join(f'{k} {v}' for k, v in st['ports'].items())}")
    nat = st.get("nat")
    if isinstance(nat, dict):
        print(f"nat      {nat.get('type')}  public {nat.get('public_address') or '-'}")
    else:
        print("nat      not reported by this node")
    pm = st.get("portmap")
    if isinstance(pm, dict):
        maps = "  ".join(f"{x['protocol']} {x['external']}" for x in pm.get("mappings") or [])
        print(f"portmap  {maps or 'none'}  {pm.get('method') or ''}"
              + (f"  ({pm['error']})" if pm.get("error") and not maps else ""))
    m = st.get("paths")
    if isinstance(m, dict):
        opened = "  ".join(f"{k} {v}" for k, v in (m.get("opened") or {}).items() if v)
        print(f"paths    {opened or 'none yet'}  upgrades {m.get('upgrades', 0)}"
              f"  relay bytes in {m.get('relay_bytes_in', 0)}")
    if "dht" in st:
        d = st["dht"]
        print(f"dht      mode {d['mode']}  contacts {d['contacts']}  records held {d['records_held']}")
    peers = st.get("peers", [])
    print(f"peers    {len(peers)}")
    for p in peers:
        print(f"  {p['public_key'][:16]}  {'in ' if p['inbound'] else 'out'}  {p.get('path', 'direct')}")
    if isinstance(st.get("tasks"), dict):
        print("tasks    (scope [policy]: running tasks)")
        _print_scope(st["tasks"], "  ")
    print(f"workers  {len(st['workers'])}")
    for w in st["workers"]:
        load = w["load"]
        state = "EJECTED" if w.get("ejected_by") else (w["state"] or "?")
        seen = w.get("last_seen_s")
        adm = admission_label(w.get("admission"))
        mark = f"{adm:12} " if adm else ""
        print(f"  {w['public_key'][:16]}  {mark}{state:8} seen {'?' if seen is None else f'{seen:g}s'} ago  "
              f"queue {load.get('queue', 0)}  in-flight "
              f"{load.get('in_flight', 0)}  ewma {load.get('ewma_ms', 0)} ms  models {','.join(map(str, w['models'])) or '-'}")
    unverified = [w for w in st["workers"] if (w.get("admission") or {}).get("admitted", False) is None]
    if unverified:
        print("  (unverified: this config names no [trust] operators, so any key may announce as a worker)")
    if st.get("providers"):
        print("loaded   " + "  ".join(f"{m} on {p.removesuffix('ExecutionProvider')}" for m, p in st["providers"].items()))
    print(f"models   {len(st['models'])}")
    for m in st["models"]:
        print(f"  {m['name']}:{m['version']}  {str(m['digest'])[:12]}  {m['size']} B")
    for part, err in st["errors"].items():
        print(f"({part}: {err})", file=sys.stderr)


async def run(args: argparse.Namespace) -> int:
    st = await gather_status(args.settings, args.timeout, args.host)
    if args.json:
        print(json.dumps(st))
    else:
        print_status(st)
    return 0
