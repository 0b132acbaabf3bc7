"""The JSON log line: json.dumps-shaped text (outside checks grep `"event": "ready"`), any field value."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from swarmd.node.logging import _dumps, setup_logging


class Out(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def out():
    buf = Out()
    setup_logging("INFO", "json", buf)
    yield buf
    logger.remove()


def test_a_json_line_reads_like_json_dumps(out: Out) -> None:
    logger.bind(event="ready", public_key=b"\x01\xff", ports={"dht": 1, "rpc": 2}, big=1 << 70, ok=True,
                none=None, text='say "hi"\n', _private="x").info("node {} ready", "n1")
    line = out.getvalue().splitlines()[0]
    assert '"event": "ready"' in line and '"ports": {"dht": 1, "rpc": 2}' in line
    doc = json.loads(line)
    assert doc["msg"] == "node n1 ready" and doc["level"] == "INFO"
    assert doc["public_key"] == "01ff" and doc["big"] == 1 << 70 and doc["text"] == 'say "hi"\n'
    assert "_private" not in doc
    assert doc["ts"].endswith("+00:00") and len(doc["ts"]) == len("2026-01-01T00:00:00.000+00:00")


def test_an_exception_is_one_json_line(out: Out) -> None:
    try:
        raise ValueError('bad "value"')
    except ValueError:
        logger.bind(event="oops").exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["event"] == "oops" and 'ValueError: bad "value"' in doc["exception"]


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(), st.binary())
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                      max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), values, max_size=6))
def test_dumps_is_valid_json_with_the_same_content(doc: dict) -> None:
    def plain(v):  # what the line should hold: bytes as hex, everything else as is
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    text = _dumps(doc)
    assert json.loads(text) == plain(doc)
    def has_float(v):
        if isinstance(v, list):
            return any(has_float(x) for x in v)
        if isinstance(v, dict):
            return any(has_float(x) for x in v.values())
        return isinstance(v, float)

    if not has_float(doc):
        # float reprs may differ (1e16 / 1e+16); everything else is json.dumps's text exactly
        assert text == json.dumps(doc, ensure_ascii=False, default=lambda b: b.hex())


def test_the_library_is_silent_until_the_application_enables_it() -> None:
    """A program importing swarmd/swarmd_rpc sees no log line unless it asks (loguru's
    logger.disable("swarmd") convention); quiet_logs() still turns them on."""
    import subprocess
    import sys

    from tests.conftest import ROOT, swarmd_env

    code = """
import asyncio, sys
from swarmd.dht import DhtConfig, DhtNode
from swarmd.node.identity import Identity

async def main():
    d = DhtNode(Identity.generate(), DhtConfig(host="127.0.0.1", port=0, mode="server"))
    await d.start()
    await d.stop()

asyncio.run(main())
print("---", file=sys.stderr, flush=True)
import swarmd_rpc
swarmd_rpc.quiet_logs("INFO")
asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=swarmd_env(), cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    before, _, after = r.stderr.partition("---\n")
    assert before == ""
    assert "dht node started" in after
