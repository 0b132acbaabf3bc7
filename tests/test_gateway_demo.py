"""`make run` end to end: the demo process starts, prints a working curl example, and stops on Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, swarmd_env


@contextlib.contextmanager
def _demo(data_dir) -> Iterator[tuple[subprocess.Popen, str, str, str, bytes]]:  # noqa: ANN001
    """`python -m swarmd.demo` (what `make run` starts) on data_dir with a free HTTP port: yields
    (process, its output up to the banner's last line, gateway url, admin key, the curl example's
    body); the process is killed on the way out if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmd.demo", "--data-dir", str(data_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=swarmd_env(), cwd=str(ROOT),
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline(65536)
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        else:
            raise AssertionError("no banner within 120 s:\n" + "".join(lines))
        text = "".join(lines)
        url = re.search(r"gateway:\s+(http://\S+)", text).group(1)
        key = re.search(r"admin key: (\S+)", text).group(1)
        yield proc, text, url, key, re.search(r"-d '(.+)'", text).group(1).encode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _label(url: str, key: str, body: bytes) -> list:
    """The 'label' output of the demo's curl example, sent as printed."""
    req = urllib.request.Request(f"{url}/v2/models/digits/infer", data=body, headers={"x-api-key": key})
    with urllib.request.urlopen(req, timeout=60) as r:
        return next(o for o in json.load(r)["outputs"] if o["name"] == "label")["data"]


@pytest.mark.slow
def test_demo_prints_a_working_example_and_stops_on_ctrl_c(tmp_path):
    with _demo(tmp_path / "data") as (proc, text, url, key, body):
        assert "sample #0 is a 0, the swarm says 0" in text
        assert "swarm: bootstrap, relay, store, worker, orchestrator, gateway" in text
        assert _label(url, key, body) == [0]
        # the banner leads somewhere: its bootstrap line, data dir and python work as printed
        boot = re.search(r"^  export SWARMD_BOOTSTRAP=(\S+)$", text, re.M).group(1)
        assert re.search(r"^ bootstrap: " + re.escape(boot) + "$", text, re.M)
        assert f" data dir:  {(tmp_path / 'data').resolve()}" in text and f" python:    {sys.executable}" in text
        ls = subprocess.run([sys.executable, "-m", "swarmd", "model", "ls", "--json"], capture_output=True, text=True,
                            timeout=120, env=swarmd_env(SWARMD_BOOTSTRAP=boot), cwd=str(ROOT))
        assert ls.returncode == 0 and "digits" in [m["name"] for m in json.loads(ls.stdout)], ls.stderr
        st = re.search(r"^  (swarmd status --data-dir \S+)$", text, re.M).group(1).split()
        out = subprocess.run([sys.executable, "-m", *st, "--json"], capture_output=True, text=True, timeout=120,
                             env=swarmd_env(), cwd=str(ROOT))
        assert out.returncode == 0 and "gateway" in json.loads(out.stdout)["roles"], out.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


@pytest.mark.slow
def test_second_demo_on_one_data_dir_exits_naming_the_pid_and_the_first_keeps_serving(tmp_path):
    data = tmp_path / "data"
    with _demo(data) as (first, _, url, key, body):
        status = (data / "status.json").read_text()
        assert json.loads(status)["pid"] == first.pid

        second = subprocess.run(
            [sys.executable, "-m", "swarmd.demo", "--data-dir", str(data), "--port", "0"],
            capture_output=True, text=True, timeout=120, env=swarmd_env(), cwd=str(ROOT),
        )
        out = (second.stdout + second.stderr).strip()
        assert second.returncode == 1, out
        last = out.splitlines()[-1]
        assert "in use by another swarmd" in last and f"pid {first.pid}" in last, out
        assert "Traceback" not in out and "admin key" not in out

        # the first one never noticed: same status file, still answering
        assert first.poll() is None
        assert (data / "status.json").read_text() == status
        assert _label(url, key, body) == [0]
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0
        assert not (data / "status.json").exists()
