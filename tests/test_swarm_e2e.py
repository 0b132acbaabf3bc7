"""Separate processes started with the real CLI find each other through a
bootstrap node and exchange RPCs: `--role bootstrap` daemons, `swarmd topic
lookup/join` and `swarmd peers`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Daemon, run_cli, swarmd_env


def _join(name: str, boot: str, data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "swarmd", "topic", "join", name, "--json", "--bootstrap", boot, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=swarmd_env(), cwd=str(ROOT),
    )  # fmt: skip


def test_processes_find_each_other_through_a_bootstrap_node(tmp_path: Path) -> None:
    boot = Daemon("--role", "bootstrap", "--data-dir", str(tmp_path / "boot"))
    node = None
    joins: list[subprocess.Popen[str]] = []
    try:
        ready = boot.wait_event("ready")
        addr = f"127.0.0.1:{ready['ports']['dht']}"
        node = Daemon("--role", "bootstrap", "--bootstrap", addr, "--data-dir", str(tmp_path / "node"))
        node_pk = node.wait_event("ready")["public_key"]

        # a third process looks the node up by its key alone
        out = run_cli("topic", "lookup", f"swarmd/peer/{node_pk}", "--json", "--bootstrap", addr)
        assert out.returncode == 0, out.stderr[-2000:]
        assert [r["public_key"] for r in json.loads(out.stdout)] == [node_pk]

        # ... and asks the running node for its peers over RPC
        out = run_cli("peers", "--json", "--data-dir", str(tmp_path / "node"))
        assert out.returncode == 0, out.stderr[-2000:]
        status = json.loads(out.stdout)
        assert status["public_key"] == node_pk and status["dht"]["contacts"]

        # two `topic join` processes connect to each other
        joins = [_join("e2e-demo", addr, tmp_path / f"j{i}") for i in range(2)]
        joined = [json.loads(p.stdout.readline()) for p in joins]  # each says its key at once
        assert all(e["event"] == "joined" for e in joined)
        events = [json.loads(p.stdout.readline()) for p in joins]
        assert all(e["event"] == "open" for e in events)
        assert events[0]["public_key"] == joined[1]["public_key"] and events[1]["public_key"] == joined[0]["public_key"]
    finally:
        for p in joins:
            p.terminate()
            p.communicate(timeout=30)  # also closes its pipe
        if node is not None:
            node.stop()
        boot.stop()
    assert all(p.returncode == 0 for p in joins)
