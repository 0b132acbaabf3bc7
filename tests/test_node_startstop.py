"""Start and stop of real daemons (issue 17 node lifecycle, issue 14 item 6): one daemon
per data dir, start-up checks before side effects, start failures that exit at once with
one line, a bootstrap that comes up after the node, and a quick idle stop."""

from __future__ import annotations

import json
import signal
import socket
import time

from tests.conftest import run_cli, swarmd_env
from tests.models import mlp_model


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_second_daemon_on_one_data_dir_is_refused_naming_the_pid(tmp_path, daemons):
    first = daemons("--data-dir", str(tmp_path))
    first.wait_event("ready")
    status = json.loads((tmp_path / "status.json").read_text())
    r = run_cli("--data-dir", str(tmp_path), "--log-format", "text")
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "in use by another swarmd" in last and f"pid {first.proc.pid}" in last, r.stderr
    assert "Traceback" not in r.stderr
    # the refused daemon touched nothing of the first one's: its status file is intact
    assert json.loads((tmp_path / "status.json").read_text()) == status
    assert first.proc.poll() is None
    assert first.stop(signal.SIGINT) == 0
    assert not (tmp_path / "status.json").exists()
    # the lock died with its holder: the data dir is usable again at once
    again = daemons("--data-dir", str(tmp_path))
    again.wait_event("ready")
    assert again.stop() == 0


def test_lock_released_by_kill_9(tmp_path, daemons):
    first = daemons("--data-dir", str(tmp_path))
    first.wait_event("ready")
    first.kill()
    second = daemons("--data-dir", str(tmp_path))
    assert second.wait_event("ready")["pid"] == second.proc.pid
    assert second.stop() == 0


def test_http_port_taken_fails_before_any_key_is_created(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        r = run_cli("--role", "gateway", "--data-dir", str(tmp_path), "--http", f"127.0.0.1:{port}",
                    "--log-format", "text")
    finally:
        taken.close()
    assert r.returncode == 1, r.stderr
    assert f"gateway cannot listen on 127.0.0.1:{port}" in r.stderr.strip().splitlines()[-1]
    assert "admin API key" not in r.stdout
    # no side effect: no identity, no key database (so the next start prints the first key)
    assert not (tmp_path / "identity.key").exists()
    assert not (tmp_path / "gateway").exists()


def test_first_admin_key_printed_once_the_gateway_listens(tmp_path, daemons):
    d = daemons("--role", "gateway", "--data-dir", str(tmp_path), "--http", "127.0.0.1:0")
    d.wait_event("ready")
    assert sum(line.startswith("swarmd gateway: first admin API key") for line in d.lines) == 1
    assert d.stop() == 0


def test_missing_models_file_exits_nonzero_quickly_with_one_line(tmp_path):
    missing = tmp_path / "nope.onnx"
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[worker]\nmodels = ["m={missing}"]\n')
    t0 = time.monotonic()
    r = run_cli("--config", str(cfg), "--role", "worker", "--data-dir", str(tmp_path / "d"),
                "--log-format", "text", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "does not exist" in lines[0], r.stderr
    assert not (tmp_path / "d" / "identity.key").exists()
    print(f"missing worker.models file: exit 1 after {took:.2f}s (process start included)")


def test_unloadable_model_file_fails_start_with_one_line_not_a_hang(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[worker]\nmodels = ["m={bad}"]\n')
    for _ in range(3):  # the hang was intermittent: 2 of 3 starts
        r = run_cli("--config", str(cfg), "--role", "worker", "--data-dir", str(tmp_path / "d"),
                    "--log-format", "text", timeout=60)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert "start failed" in r.stderr.strip().splitlines()[-1]


def test_worker_started_before_its_bootstrap_becomes_ready(tmp_path, daemons):
    port = _free_udp_port()
    worker = daemons("--role", "worker", "--data-dir", str(tmp_path / "w"),
                     "--bootstrap", f"127.0.0.1:{port}")
    first = worker.wait_event("bootstrap_retry")
    second = worker.wait_event("bootstrap_retry")
    assert second["attempt"] == first["attempt"] + 1
    boot = daemons("--role", "bootstrap", "--data-dir", str(tmp_path / "b"), "--dht-port", str(port))
    boot.wait_event("ready")
    ready = worker.wait_event("ready", timeout=90)
    assert ready["roles"] == ["worker"]
    assert worker.stop() == 0 and boot.stop() == 0


def test_sigterm_while_waiting_for_bootstrap_stops_at_once(tmp_path, daemons):
    d = daemons("--data-dir", str(tmp_path), "--bootstrap", f"127.0.0.1:{_free_udp_port()}")
    d.wait_event("bootstrap_retry")
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    print(f"stop while waiting for a bootstrap: {time.monotonic() - t0:.2f}s")
    assert any('"event": "start_abandoned"' in line for line in d.lines)
    assert not (tmp_path / "status.json").exists()


def test_idle_worker_stops_quickly_on_sigint(tmp_path, daemons):
    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp_model((16, 64, 4)))
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[worker]\nmodels = ["mlp={model}"]\n')
    boot = daemons("--role", "bootstrap", "--data-dir", str(tmp_path / "b"))
    port = boot.wait_event("ready")["ports"]["dht"]
    w = daemons("--config", str(cfg), "--role", "worker", "--data-dir", str(tmp_path / "w"),
                "--bootstrap", f"127.0.0.1:{port}")
    w.wait_event("ready")
    gw = daemons("--role", "gateway,orchestrator", "--data-dir", str(tmp_path / "g"), "--http", "127.0.0.1:0",
                 "--bootstrap", f"127.0.0.1:{port}")
    gw.wait_event("ready")
    time.sleep(2)  # let the worker, orchestrator and gateway find each other
    gw.kill()
    boot.kill()  # the rest of the swarm is gone: stopping must not wait on it
    t0 = time.monotonic()
    assert w.stop(signal.SIGINT) == 0
    took = time.monotonic() - t0
    stopped = json.loads(next(line for line in w.lines if '"event": "stopped"' in line))
    print(f"idle worker, swarm gone: SIGINT -> exit in {took:.2f}s (node's own stop {stopped.get('seconds')}s)")
    assert took < 30  # a bound a stall cannot reach on a loaded box; the figure is printed


def test_env_bounds_bootstrap_wait(tmp_path):
    env = swarmd_env(SWARMD_BOOTSTRAP_WAIT="5")
    r = run_cli("--data-dir", str(tmp_path), "--log-format", "text",
                "--bootstrap", f"127.0.0.1:{_free_udp_port()}", env=env)
    assert r.returncode == 1
    assert "no bootstrap node answered" in r.stderr.strip().splitlines()[-1]
    assert "trying again" in r.stderr
