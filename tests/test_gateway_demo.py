"""`make run` end to end: the demo process starts, prints a working curl example, and stops on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT, swarmd_env


@pytest.mark.slow
def test_demo_prints_a_working_example_and_stops_on_ctrl_c(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmd.demo", "--data-dir", str(tmp_path / "data"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=swarmd_env(), cwd=str(ROOT),
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        text = "".join(lines)
        url = re.search(r"gateway:\s+(http://\S+)", text).group(1)
        key = re.search(r"admin key: (\S+)", text).group(1)
        data = re.search(r"-d '(.+)'", text).group(1)
        assert "sample #0 is a 0, the swarm says 0" in text
        assert "swarm: bootstrap, relay, store, worker, orchestrator, gateway" in text
        req = urllib.request.Request(f"{url}/v2/models/digits/infer", data=data.encode(), headers={"x-api-key": key})
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.load(r)
        assert next(o for o in doc["outputs"] if o["name"] == "label")["data"] == [0]
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
