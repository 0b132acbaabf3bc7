"""`swarmd keys create|revoke|ls`: manage the gateway's API keys in the data dir's database.

Works whether or not the daemon is running: the gateway notices changes made
here on its next request (see swarmd.gateway.keys).
"""

from __future__ import annotations

import argparse
import json
import time

from swarmd.daemon import ensure_data_dir
from swarmd.gateway.keys import PERMISSIONS, KeyStore

NAME = "keys"
HELP = "create, revoke and list the gateway's API keys (stored hashed in <data dir>/gateway/keys.sqlite)"
FLAGS = ("data_dir", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True,
                                parser_class=type(parser))
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--permissions", default="infer",
                   help=f"comma-separated, from: {', '.join(PERMISSIONS)} (default: infer)")
    c.add_argument("--rate", type=float, default=None, help="requests per second (default: gateway.rate_limit_rps)")
    c.add_argument("--burst", type=float, default=None, help="burst size (default: gateway.rate_limit_burst)")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id")
    sub.add_parser("ls", help="list keys (masked) with usage and rate limits")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _rate(own: float | None, default: float) -> str:
    return f"{own:g}" if own is not None else f"{default:g}*"


def run(args: argparse.Namespace) -> int:
    data_dir = ensure_data_dir(args.settings.node.data_dir)
    store = KeyStore(data_dir / "gateway" / "keys.sqlite")
    try:
        if args.keys_command == "create":
            key, token = store.create(args.name, args.permissions, rate_rps=args.rate, rate_burst=args.burst)
            if args.json:
                print(json.dumps({**key.public(), "key": token}))
            else:
                print(token)
                print(f"# id {key.id}, permissions {','.join(sorted(key.permissions))}, stored in "
                      f"{data_dir / 'gateway' / 'keys.sqlite'}; shown once, store it now")
        elif args.keys_command == "revoke":
            key = store.revoke(args.id)
            print(json.dumps({"revoked": key.public()}) if args.json else f"revoked {key.id}")
        else:
            keys = [k.public() for k in store.list()]
            if args.json:
                print(json.dumps({"keys": keys}))
            else:
                gw = args.settings.gateway
                print(f"{'ID':<13} {'NAME':<16} {'PERMISSIONS':<32} {'RATE/S':>8} {'BURST':>7} "
                      f"{'REQUESTS':>9} {'DENIED':>7} {'LAST USED':<17} STATE")
                for k in keys:
                    state = "revoked" if k["revoked"] else "active"
                    # a key without its own limits gets the gateway's (marked *)
                    rps = _rate(k["rate_limit_rps"], gw.rate_limit_rps)
                    burst = _rate(k["rate_limit_burst"], gw.rate_limit_burst)
                    print(f"{k['id']:<13} {k['name'][:16]:<16} {','.join(k['permissions'])[:32]:<32} {rps:>8} "
                          f"{burst:>7} {k['requests']:>9} {k['denied']:>7} {_when(k['last_used']):<17} {state}")
                if not keys:
                    print(f"(no keys in {data_dir / 'gateway' / 'keys.sqlite'})")
                elif any(k["rate_limit_rps"] is None or k["rate_limit_burst"] is None for k in keys):
                    print("(* the gateway's default: gateway.rate_limit_rps / rate_limit_burst)")
    finally:
        store.close()
    return 0
