"""`swarmd identity`: print this node's public key (creating the key on first use)."""

from __future__ import annotations

import argparse
import json

from swarmd.daemon import ensure_data_dir
from swarmd.node.identity import Identity

NAME = "identity"
HELP = "print this node's public key (hex), creating the key file on first use"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON object")


def run(args: argparse.Namespace) -> int:
    data_dir = ensure_data_dir(args.settings.node.data_dir)
    ident = Identity.load_or_create(data_dir / "identity.key")
    if args.json:
        print(json.dumps({"public_key": ident.public_hex, "key_file": str(data_dir / "identity.key")}))
    else:
        print(ident.public_hex)
    return 0
