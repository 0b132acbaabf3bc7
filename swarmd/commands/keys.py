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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True,
                                parser_class=type(parser))
    c = sub.add_parser("create", help="create a key and print it once")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--permissions", default="infer",
                   help=f"comma-separated, from: {', '.join(PERMISSIONS)} (default: infer)")
    c.add_argument("--rate", type=float, default=None, help="requests per second (default: gateway.rate_limit_rps)")
    c.add_argument("--burst", type=float, default=None, help="burst size (default: gateway.rate_limit_burst)")
    c.add_argument("--json", action="store_true")
    r = sub.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id")
    r.add_argument("--json", action="store_true")
    ls = sub.add_parser("ls", help="list keys (masked) with usage")
    ls.add_argument("--json", action="store_true")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


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
                print(f"# id {key.id}, permissions {','.join(sorted(key.permissions))}; shown once, store it now")
        elif args.keys_command == "revoke":
            key = store.revoke(args.id)
            print(json.dumps({"revoked": key.public()}) if args.json else f"revoked {key.id}")
        else:
            keys = [k.public() for k in store.list()]
            if args.json:
                print(json.dumps({"keys": keys}))
            else:
                print(f"{'ID':<13} {'NAME':<16} {'PERMISSIONS':<32} {'REQUESTS':>9} {'DENIED':>7} {'LAST USED':<17} STATE")
                for k in keys:
                    state = "revoked" if k["revoked"] else "active"
                    print(f"{k['id']:<13} {k['name'][:16]:<16} {','.join(k['permissions'])[:32]:<32} "
                          f"{k['requests']:>9} {k['denied']:>7} {_when(k['last_used']):<17} {state}")
    finally:
        store.close()
    return 0
