"""`swarmd call PUBKEY METHOD`: find a peer by key on the DHT and call it, via the real CLI."""

import json

from tests.conftest import run_cli


def test_call_by_public_key_through_the_dht(tmp_path, daemons):
    boot = daemons("--role", "bootstrap", "--data-dir", str(tmp_path / "b"))
    dht_port = boot.wait_event("ready")["ports"]["dht"]
    bootstrap = f"127.0.0.1:{dht_port}"
    node = daemons("--data-dir", str(tmp_path / "n"), "--bootstrap", bootstrap)
    key = node.wait_event("ready")["public_key"]
    elsewhere = str(tmp_path / "operator")

    r = run_cli("call", key, "ping", "--bootstrap", bootstrap, "--data-dir", elsewhere)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == "pong"

    r = run_cli("call", key, "noSuchMethod", "--bootstrap", bootstrap, "--data-dir", elsewhere)
    assert r.returncode == 1
    assert r.stderr.startswith("swarmd call: ERR_UNKNOWN_METHOD: ") and "noSuchMethod" in r.stderr

    # --list: the peer's methods with their op, from the peer itself (introspection, not a table here)
    r = run_cli("--bootstrap", bootstrap, "call", key, "--list", "--json", "--data-dir", elsewhere)
    assert r.returncode == 0, r.stderr
    methods = {m["name"]: m["op"] for m in json.loads(r.stdout)}
    assert methods["ping"] == "r" and methods["listMethods"] == "r" and methods["nat.probe"] == "w"
    r = run_cli("call", key, "--list", "--data-dir", str(tmp_path / "n"))
    assert r.returncode == 0 and "r  swarm.status" in r.stdout.splitlines(), r.stderr

    # the local node is found through its status.json, no DHT needed
    r = run_cli("call", key, "getInstanceId", "--data-dir", str(tmp_path / "n"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == (tmp_path / "n" / "instance_id").read_text().strip()

    unknown = "11" * 32
    r = run_cli("call", unknown, "ping", "--bootstrap", bootstrap, "--data-dir", elsewhere, "--timeout", "3")
    assert r.returncode == 1 and r.stderr.startswith("swarmd call: ERR_NOT_FOUND")


def test_call_rejects_bad_input(tmp_path):
    r = run_cli("call", "xyz", "ping", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "64 hex digits" in r.stderr
    r = run_cli("call", "11" * 32, "ping", "--data", "{not json", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "--data is not valid JSON" in r.stderr
    r = run_cli("call", "11" * 32, "--data-dir", str(tmp_path))
    assert r.returncode == 1 and r.stderr == "swarmd call: ERR_BAD_REQUEST: give either METHOD or --list\n"
