"""Every example in examples/ runs with its one command and says what it promised.

Each starts its own swarm processes on 127.0.0.1 with the real CLI and stops
them by PID; the last line it prints is a JSON summary checked here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, swarmd_env

pytestmark = pytest.mark.slow


def run_example(path: str, timeout: float = 170.0) -> dict:
    # its own process group, so a hung example and the daemons it started can be stopped together
    proc = subprocess.Popen([sys.executable, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT), env=swarmd_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{path} did not finish within {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "stopped" in out or "stopping" in out  # it stopped what it started
    return json.loads(out.strip().splitlines()[-1])


def test_logistics_orders_a_day_of_deliveries() -> None:
    s = run_example("examples/logistics/run.py")
    assert s["stops"] == 12 and sorted(s["order"]) == list(range(12))
    assert s["model_mae_min"] < 5.0  # the regression learned the city, within minutes
    assert s["greedy_min"] < s["given_order_min"]  # planning on predictions beats the given order


def test_digits_through_tritonclient_and_swarmd_rpc() -> None:
    s = run_example("examples/digits/run.py")
    assert s["n"] == 200 and s["agree"] is True
    assert s["http_accuracy"] > 0.9 and s["rpc_accuracy"] > 0.9


def test_three_box_readme_commands_on_loopback() -> None:
    s = run_example("examples/three-box/run_loopback.py")
    assert s["boxes"] == 4
    assert s["cli_labels"] == s["http_labels"] == [0, 1, 2]
