"""`swarmd grant ROLE[,ROLE...] PUBKEY`: sign a role grant with an operator key.

The printed line goes into the granted node's `[trust] grants`; every node of
the swarm that names the operator's public key in `[trust] operators` then
admits that node to those roles until the grant expires (swarmd.node.trust,
docs/operations.md "Trust model").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from swarmd.errors import ERR_BAD_REQUEST, SwarmdError
from swarmd.node.identity import Identity
from swarmd.node.trust import GRANTABLE_ROLES, Grant, GrantError, parse_duration, parse_key

NAME = "grant"
HELP = "sign an expiring role grant for a node's public key with an operator key"
FLAGS = ("data_dir", "json")  # --json: a JSON object with the grant and its fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "roles", metavar="ROLE[,ROLE...]", help=f"comma-separated, from: {', '.join(GRANTABLE_ROLES)}"
    )
    parser.add_argument(
        "public_key", metavar="PUBKEY", help="the node's public key (64 hex digits, `swarmd identity`)"
    )
    parser.add_argument(
        "--expires", default="90d", help="how long the grant is valid: 90d, 12h, 30m, 3600s (default: 90d)"
    )
    parser.add_argument(
        "--key", type=Path, default=None, help="the operator's key file (default: <data dir>/identity.key)"
    )


def run(args: argparse.Namespace) -> int:
    key_file = args.key or Path(args.settings.node.data_dir) / "identity.key"
    operator = Identity.load(key_file)
    try:
        subject = parse_key(args.public_key, "PUBKEY")
        grant = Grant.issue(operator, args.roles, subject, expires=time.time() + parse_duration(args.expires))
    except GrantError as e:
        raise SwarmdError(ERR_BAD_REQUEST, str(e)) from None
    if args.json:
        print(json.dumps({"grant": grant.to_text(), **grant.describe()}))
    else:
        print(grant.to_text())
        d = grant.describe()
        print(
            f"# {','.join(d['roles'])} for {d['subject'][:16]}… until {d['expires']}, signed by operator "
            f"{d['issuer']}; add the line above to that node's [trust] grants",
            file=sys.stderr,
        )
    return 0
