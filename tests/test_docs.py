"""The docs cannot rot: runnable blocks in README.md and docs/*.md are executed here.

Convention: a fenced block directly under `<!-- run -->` runs on its own; under
`<!-- run: swarm -->` it runs with SWARMD_BOOTSTRAP pointing at a swarm started
for this module (bootstrap + store + orchestrator, and a worker) whose store
holds the digits model. ```python blocks run with this interpreter, ```sh
blocks with `bash -e -o pipefail` where `swarmd` and `python` mean this checkout
and interpreter. Each block gets a scratch working directory and data dir
(SWARMD_DATA_DIR). Every ```toml block must load as a config file, and
docs/configuration.md must match what `python -m swarmd.docs_config` writes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, Daemon, swarmd_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<marker><!-- run(?::\s*(?P<needs>[\w-]+))? -->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    body: str
    run: bool
    needs: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("lang")) + 1
            out.append(Block(path, line, m.group("lang"), m.group("body"), m.group("marker") is not None,
                             m.group("needs")))
    return out


RUNNABLE = [b for b in blocks() if b.run]
TOML = [b for b in blocks() if b.lang == "toml"]


def test_the_convention_finds_blocks() -> None:
    assert any(b.needs == "swarm" for b in RUNNABLE) and any(b.needs is None for b in RUNNABLE)
    assert all(b.lang in ("python", "sh") for b in RUNNABLE), [b.id for b in RUNNABLE]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A hub and a worker (real daemons on 127.0.0.1) with the digits model in the store."""
    from swarmd.demo import build_digits_model

    tmp = tmp_path_factory.mktemp("docs-swarm")
    model = tmp / "digits.onnx"
    build_digits_model(model)
    hub = Daemon("--role", "bootstrap,store,orchestrator", "--data-dir", str(tmp / "hub"))
    worker = None
    try:
        boot = f"127.0.0.1:{hub.wait_event('ready')['ports']['dht']}"
        worker = Daemon("--role", "worker", "--bootstrap", boot, "--data-dir", str(tmp / "worker"))
        worker.wait_event("ready")
        from swarmd_rpc import SyncClient

        with SyncClient(bootstrap=[boot]) as c:
            c.models.push(model, "digits", "1")
        yield boot
    finally:
        for d in (worker, hub):
            if d is not None:
                d.stop()


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_runnable_block(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    extra = {"SWARMD_DATA_DIR": str(tmp_path / "data")}
    if block.needs == "swarm":
        extra["SWARMD_BOOTSTRAP"] = request.getfixturevalue("swarm")
    elif block.needs is not None:
        pytest.fail(f"{block.id}: unknown run requirement {block.needs!r}")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, cmd in (("swarmd", f'"{sys.executable}" -m swarmd'), ("python", f'"{sys.executable}"')):
        (bindir / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        (bindir / name).chmod(0o755)
    env = swarmd_env(**extra)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    work = tmp_path / "work"
    work.mkdir()
    script = work / ("block.py" if block.lang == "python" else "block.sh")
    script.write_text(block.body)
    argv = [sys.executable, str(script)] if block.lang == "python" else ["bash", "-e", "-o", "pipefail", str(script)]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(work), timeout=90)
    assert r.returncode == 0, f"{block.id} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("block", TOML, ids=[b.id for b in TOML])
def test_toml_block_is_a_valid_config(block: Block, tmp_path: Path) -> None:
    from swarmd.node.config import load_settings
    from swarmd.settings import Settings

    cfg = tmp_path / "swarmd.toml"
    cfg.write_text(block.body)
    load_settings(Settings, config_file=cfg, env_name="production", environ={}, flags={})


def test_configuration_reference_is_current() -> None:
    from swarmd.docs_config import render

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == render(), "docs/configuration.md is stale: run `python -m swarmd.docs_config`"


def test_configuration_reference_lists_every_key() -> None:
    import dataclasses

    from swarmd.settings import Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"## [{f.name}]" in text
        for key in dataclasses.fields(f.default_factory()):  # type: ignore[misc]
            nested = key.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(key.default_factory)
            want = f"## [{f.name}.{key.name}]" if nested else f"`{key.name}`"
            assert want in text, f"[{f.name}] {key.name} missing"


def test_every_configuration_key_and_section_has_a_description() -> None:
    """One clear line per key in docs/configuration.md: its comment in the config dataclass."""
    from swarmd.docs_config import missing_descriptions

    assert missing_descriptions() == []
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert "Config(" not in text  # no dataclass signature standing in for a section's description


def test_gateway_doc_quotes_the_real_limits_and_messages() -> None:
    """docs/gateway.md's "Known limits" and error example say what the code does."""
    import numpy as np

    from swarmd.gateway.config import GatewayConfig
    from swarmd.signature import ModelSignature, TensorSpec

    text = " ".join((ROOT / "docs" / "gateway.md").read_text().split())
    cfg = GatewayConfig()
    assert f"`header_timeout` ({cfg.header_timeout:g} s)" in text and "no timeout" not in text
    sig = ModelSignature(inputs=(TensorSpec("x", "float32", (-1, 4)),), outputs=())
    try:
        sig.validate("m", {"x": np.zeros((1, 5), np.float32)})
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        assert f"`{e.message}`" in text  # type: ignore[attr-defined]
    else:
        raise AssertionError("a wrong shape was accepted")
    ops = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert "within 0.25 s" in ops and "next request" not in ops


def test_every_error_code_is_documented_in_the_protocol() -> None:
    from swarmd.errors import ALL_CODES

    text = (ROOT / "docs" / "protocol.md").read_text()
    missing = sorted(c for c in ALL_CODES if c not in text)
    assert not missing, f"docs/protocol.md does not mention {missing}"


# Pages another engineer's branch adds; a link to one is allowed to dangle until it lands.
PENDING_PAGES = {"docs/nat.md"}


def test_relative_links_point_at_files() -> None:
    link = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)")
    broken = []
    for path in [*DOCS, ROOT / "examples" / "three-box" / "README.md"]:
        for target in link.findall(path.read_text()):
            resolved = (path.parent / target).resolve()
            rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            if not resolved.exists() and rel not in PENDING_PAGES:
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_test_the_attack_table_names_exists() -> None:
    """docs/operations.md maps each attack of the trust review to its tests: a renamed or deleted
    test must not leave an attack pointing at nothing."""
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text[text.index("**What the trust model was tested against.**"):text.index("## Metrics")]
    named: list[tuple[str, str]] = []
    for row in table.splitlines():
        if not row.startswith("| ") or row.startswith("| #"):
            continue
        module = ""
        for ref in re.findall(r"`([^`]+)`", row.rsplit(" | ", 1)[-1]):
            m = re.fullmatch(r"(test_\w+\.py)?(?:::(\w+))?(?: \(.*\))?", ref)
            if m is None or not (m.group(1) or m.group(2)):
                continue
            module = m.group(1) or module
            if m.group(2):
                named.append((module, m.group(2)))
            else:
                assert (ROOT / "tests" / module).exists(), module
    assert len(named) >= 30
    for module, name in named:
        src = (ROOT / "tests" / module).read_text()
        assert re.search(rf"^(async )?def {name}\(", src, re.M), f"{module}::{name} named in the attack table"
