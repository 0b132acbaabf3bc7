"""`swarmd nat`: the NAT report and connection paths of the running node, and a path test.

    swarmd nat status [--json]            NAT type, signal peers, each connection's path
    swarmd nat probe PUBKEY [--bytes N] [--watch S]
                                          connect to PUBKEY (first path that works, punches
                                          behind it), one RPC round trip; with --watch, keep
                                          calling and streaming until the path is final (at
                                          most S seconds), counting failures; then stream N
                                          bytes; prints the paths

Both talk to the node running on the same --data-dir (its status.json), with
that node's own key, so `probe` runs from the node itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swarmd.commands.reach import call_local_node, operator_identity

NAME = "nat"
HELP = "NAT type and connection paths of the running node; `probe` tests the path to a peer"
FLAGS = ("data_dir", "host", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="nat_command", metavar="status|probe", required=True,
                                parser_class=type(parser))
    st = sub.add_parser("status", help="NAT report, signal peers and each connection's path")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds for the answer (default 10)")
    pr = sub.add_parser("probe", help="connect to a peer, one RPC round trip, stream N bytes; print the path")
    pr.add_argument("public_key", help="the peer's public key (hex)")
    pr.add_argument("--bytes", type=int, default=0, help="bytes to stream to the peer (default 0)")
    pr.add_argument("--watch", type=float, default=0.0,
                    help="seconds to keep calling and streaming while the path upgrades (default 0: no)")
    pr.add_argument("--fresh", action="store_true", help="close a pooled connection to the peer first (time a dial)")
    pr.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole probe (default 120)")


async def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.settings.node.data_dir)
    method, params = "nat.status", None
    if args.nat_command == "probe":
        method = "nat.probe"
        params = {"target": args.public_key, "bytes": args.bytes, "watch": args.watch, "fresh": args.fresh}
    out = await call_local_node(data_dir, args.host, method, params, args.timeout,
                                identity=operator_identity(args))
    if args.json:
        print(json.dumps(out))
        return 0
    if args.nat_command == "status":
        nat = out.get("nat", {})
        print(f"nat {nat.get('type')}  public {nat.get('public_address')}  answers {nat.get('answers')}/{nat.get('asked')}")
        print(f"signal peers: {', '.join(k[:16] for k in out.get('signal_peers', [])) or '-'}")
        for pk, info in out.get("paths", {}).items():
            print(f"  {pk[:16]}  {info.get('path')}  setup {info.get('setup_ms')} ms")
        m = out.get("metrics") or {}
        if m:
            opened = "  ".join(f"{k} {v}" for k, v in m.get("opened", {}).items())
            print(f"opened: {opened}  upgrades {m.get('upgrades')} (p50 {m.get('upgrade_ms_p50')} ms)"
                  f"  relay bytes in {m.get('relay_bytes_in')}")
    else:
        line = f"path {out['path']}  first {out.get('first_path')}  connect {out['connect_ms']} ms  rtt {out['rtt_ms']} ms"
        if "watch" in out:
            w = out["watch"]
            line += (f"  final {w['final_path']} at {w['final_ms']} ms  calls {w['calls_ok']} ok {w['calls_failed']} failed"
                     f"  streams {w['streams_ok']} ok {w['streams_failed']} failed")
        if "stream" in out:
            s = out["stream"]
            line += f"  stream {s['bytes']} B ok={s['ok']} {s['mib_s']} MiB/s"
        print(line)
    return 0
