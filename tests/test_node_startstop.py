"""Start and stop of real daemons (issue 17 node lifecycle, issue 14 item 6): one daemon
per data dir, start-up checks before side effects, start failures that exit at once with
one line, a bootstrap that comes up after the node, and a quick idle stop."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import numpy as np

from swarmd.rpc import connect
from tests.conftest import run_cli, swarmd_env
from tests.swarm_daemons import free_udp_port, serve_mlp, start_hub, start_node, start_worker


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
    port = free_udp_port()
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
    d = daemons("--data-dir", str(tmp_path), "--bootstrap", f"127.0.0.1:{free_udp_port()}")
    d.wait_event("bootstrap_retry")
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    print(f"stop while waiting for a bootstrap: {time.monotonic() - t0:.2f}s")
    assert any('"event": "start_abandoned"' in line for line in d.lines)
    assert not (tmp_path / "status.json").exists()


def test_idle_worker_stops_quickly_on_sigint(tmp_path, daemons):
    models = serve_mlp(tmp_path)
    boot_d, boot = start_hub(daemons, tmp_path / "b")
    w, _ = start_worker(daemons, tmp_path / "w", boot, models=models)
    gw, _ = start_node(daemons, "gateway,orchestrator", tmp_path / "g", boot, "--http", "127.0.0.1:0")
    time.sleep(2)  # let the worker, orchestrator and gateway find each other
    gw.kill()
    boot_d.kill()  # the rest of the swarm is gone: stopping must not wait on it
    t0 = time.monotonic()
    assert w.stop(signal.SIGINT) == 0
    took = time.monotonic() - t0
    stopped = json.loads(next(line for line in w.lines if '"event": "stopped"' in line))
    print(f"idle worker, swarm gone: SIGINT -> exit in {took:.2f}s (node's own stop {stopped.get('seconds')}s)")
    assert took < 30  # a bound a stall cannot reach on a loaded box; the figure is printed
    # the behaviour: an idle node stops within 3 s, timed by the node itself (from the
    # signal to its last task, so interpreter start and exit on a loaded box do not count)
    assert stopped["seconds"] <= 3.0, stopped


# A drain that waited for its grace period would take this long: each test below stops well
# inside Daemon.stop's 30 s bound only if the drain ends when nothing (more) is in flight.
LONG_DRAIN = {"SWARMD_WORKER_DRAIN_TIMEOUT": "600"}


def test_idle_worker_has_nothing_to_drain_and_stops_at_once(tmp_path, daemons):
    models = serve_mlp(tmp_path)
    _, boot = start_hub(daemons, tmp_path / "b")
    w, _ = start_worker(daemons, tmp_path / "w", boot, models=models, env=swarmd_env(**LONG_DRAIN))
    assert w.stop(signal.SIGTERM) == 0  # within 30 s, not the 600 s drain grace
    assert not any('"event": "draining"' in line for line in w.lines)  # nothing accepted: no drain at all
    assert not any('"event": "drain_timeout"' in line for line in w.lines)


def test_draining_worker_stops_when_its_last_request_finishes(tmp_path, daemons):
    """SIGTERM while big requests run: the accepted ones all finish, and the worker exits as
    soon as the last one is done, not at the 600 s grace."""
    models = serve_mlp(tmp_path, dims=(16, 1024, 1024, 4))
    _, boot = start_hub(daemons, tmp_path / "b")
    w, ready = start_worker(daemons, tmp_path / "w", boot, models=models, env=swarmd_env(**LONG_DRAIN))
    x = np.ones((20000, 16), np.float32)  # ~0.5-2 s of onnxruntime each: surely in flight at the signal

    async def load_then_sigterm() -> list:
        peer = await connect(None, "127.0.0.1", ready["ports"]["rpc"],
                             remote_public_key=bytes.fromhex(ready["public_key"]), timeout=30)
        try:
            calls = [asyncio.ensure_future(peer.call("runInference", {"model": "mlp", "inputs": {"input": x}},
                                                     timeout=120)) for _ in range(3)]
            await asyncio.sleep(0.5)
            w.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await peer.close()

    results = asyncio.run(load_then_sigterm())
    code = w.proc.wait(60)  # it exits by itself once drained: far from the 600 s grace
    w.wait_output()
    assert code == 0
    drained = [json.loads(line) for line in w.lines if '"event": "draining"' in line]
    assert drained and drained[0]["queued"] + drained[0]["in_flight"] >= 1, w.lines[-20:]
    assert not any('"event": "drain_timeout"' in line for line in w.lines)
    # accepted requests finished; any that reached the worker after the signal were refused, never dropped
    ok = [r for r in results if isinstance(r, dict)]
    assert ok and all(r["outputs"]["output"].shape == (20000, 4) for r in ok), results
    assert all(getattr(r, "code", None) == "ERR_NOT_READY" for r in results if not isinstance(r, dict)), results


def test_env_bounds_bootstrap_wait(tmp_path):
    env = swarmd_env(SWARMD_BOOTSTRAP_WAIT="5")
    r = run_cli("--data-dir", str(tmp_path), "--log-format", "text",
                "--bootstrap", f"127.0.0.1:{free_udp_port()}", env=env)
    assert r.returncode == 1
    assert "no bootstrap node answered" in r.stderr.strip().splitlines()[-1]
    assert "trying again" in r.stderr
