"""`swarmd model ...` in a real subprocess against a real store on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from store_models import write_model
from store_nodes import Node, start_store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await start_store(tmp_path / "store")
    yield n
    await n.stop()


async def swarmd(node: Node, tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    action, rest = argv[0], argv[1:]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmd", "model", action, *rest,
        "--store", f"127.0.0.1:{node.server.port}", "--store-key", node.key,
        "--data-dir", str(tmp_path / "cli"), "--log-level", "ERROR",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_push_ls_show_pull_rm(node: Node, tmp_path: Path) -> None:
    f = write_model(tmp_path / "m.onnx", seed=1, pad_floats=100_000)
    rc, out, err = await swarmd(node, tmp_path, "push", str(f), "--name", "mlp", "--tag", "a", "--tag", "b",
                                "--json", "--progress", "always")
    assert rc == 0, err
    meta = json.loads(out)
    assert meta["name"] == "mlp" and meta["version"] == "1" and meta["tags"] == ["a", "b"]
    assert meta["digest"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert "100.0%" in err  # the progress bar reached the end
    rc, out, err = await swarmd(node, tmp_path, "ls", "--json")
    assert rc == 0, err
    assert json.loads(out) == [meta]
    rc, out, _ = await swarmd(node, tmp_path, "ls")
    assert rc == 0 and "mlp" in out and meta["digest"][:12] in out and "a,b" in out
    rc, out, _ = await swarmd(node, tmp_path, "show", "mlp:1")
    assert rc == 0 and json.loads(out) == meta
    dest = tmp_path / "pulled.onnx"
    rc, out, err = await swarmd(node, tmp_path, "pull", "mlp", "-o", str(dest))
    assert rc == 0, err
    assert dest.read_bytes() == f.read_bytes()
    rc, out, err = await swarmd(node, tmp_path, "rm", "mlp:1")
    assert rc == 0 and "deleted mlp:1 on 1 store" in out, err
    rc, out, err = await swarmd(node, tmp_path, "show", "mlp")
    assert rc == 1 and "ERR_NOT_FOUND" in err


async def test_cli_errors(node: Node, tmp_path: Path) -> None:
    rc, _, err = await swarmd(node, tmp_path, "rm", "mlp")
    assert rc == 1 and "NAME:VERSION" in err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk" * 100)
    rc, _, err = await swarmd(node, tmp_path, "push", str(junk), "--name", "x")
    assert rc == 1 and "ERR_INVALID_MODEL" in err
    rc, _, err = await swarmd(node, tmp_path, "push", str(junk))
    assert rc == 2 and "--name" in err
    assert "Traceback" not in err
