"""`swarmd identity`: print this node's public key (creating the key on first use)."""

from __future__ import annotations

import argparse
import json
import sys

from swarmd.daemon import ensure_data_dir
from swarmd.node.identity import Identity

NAME = "identity"
HELP = "print this node's public key (hex), creating the key file on first use"
FLAGS = ("data_dir", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    data_dir = ensure_data_dir(args.settings.node.data_dir)
    key_file = data_dir / "identity.key"
    if not key_file.exists():  # say where: a key made in the wrong data dir is a new identity
        print(f"# created a new key in {key_file}", file=sys.stderr)
    ident = Identity.load_or_create(key_file)
    if args.json:
        print(json.dumps({"public_key": ident.public_hex, "key_file": str(data_dir / "identity.key")}))
    else:
        print(ident.public_hex)
    return 0
