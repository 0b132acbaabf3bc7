"""API keys: hashing, permissions, CLI on the data dir's database, revocation seen by a running gateway."""

from __future__ import annotations

import json
import sqlite3
import time

from swarmd.gateway.keys import KeyStore
from swarmd.node.ratelimit import RateLimiter, TokenBucket
from tests.conftest import run_cli
from tests.gateway_fixtures import GatewayThread, install_model, tiny_mlp


def test_keys_are_stored_hashed_and_checked(tmp_path):
    ks = KeyStore(tmp_path / "keys.sqlite")
    key, token = ks.create("a", ["infer"])
    raw = sqlite3.connect(tmp_path / "keys.sqlite").execute("SELECT * FROM api_keys").fetchall()
    # split once: the secret is urlsafe base64 and may hold "_" itself (a short piece of it matched by chance)
    assert token not in repr(raw) and token.split("_", 2)[2] not in repr(raw)
    assert ks.authenticate(token).id == key.id
    assert ks.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert ks.authenticate("swd_" + key.id) is None
    assert ks.authenticate("x" * 1000) is None
    assert key.allows("infer") and not key.allows("models:read")
    admin, _ = ks.create("root", ["admin"])
    assert admin.allows("models:write")
    ks.revoke(key.id)
    assert ks.authenticate(token) is None
    ks.close()


def test_a_verified_token_is_refused_once_another_process_revokes_it(tmp_path):
    """authenticate() remembers verified tokens; every reload of the key table forgets them, so a
    revoke by `swarmd keys` (another KeyStore on the same file) lands as before."""
    gateway = KeyStore(tmp_path / "keys.sqlite")
    gateway.check_interval = 0.0  # look at the database on every call
    cli = KeyStore(tmp_path / "keys.sqlite")
    key, token = cli.create("a", ["infer"])
    assert gateway.authenticate(token).id == key.id
    assert gateway.authenticate(token).id == key.id  # answered from the verified tokens
    assert token in gateway._verified
    cli.revoke(key.id)
    assert gateway.authenticate(token) is None
    assert token not in gateway._verified
    cli.close()
    gateway.close()


def test_usage_counts_persist(tmp_path):
    ks = KeyStore(tmp_path / "keys.sqlite")
    key, _ = ks.create("a", ["infer"])
    for _ in range(3):
        ks.record(key.id)
    ks.record(key.id, denied=True)
    ks.close()
    again = KeyStore(tmp_path / "keys.sqlite")
    k = again.get(key.id)
    assert (k.requests, k.denied) == (3, 1) and k.last_used
    again.close()


def test_token_bucket_exact_clock():
    b = TokenBucket(rate=2.0, burst=2.0)
    assert b.take(0.0) == 0.0 and b.take(0.0) == 0.0
    assert b.take(0.0) == 0.5
    assert b.take(0.5) == 0.0
    rl = RateLimiter(1.0, 1.0, max_buckets=2)
    assert rl.take("a", 0.0) == 0.0 and rl.take("a", 0.0) > 0
    rl.take("b", 0.0)
    rl.take("c", 0.0)  # evicts a
    assert rl.take("a", 0.0) == 0.0


def test_cli_create_ls_revoke_against_running_gateway(tmp_path):
    install_model(tmp_path / "models", "mlp", "1", tiny_mlp())
    g = GatewayThread(tmp_path)
    try:
        r = run_cli("keys", "--data-dir", str(tmp_path), "create", "--name", "cli", "--permissions",
                    "models:read", "--json")
        assert r.returncode == 0, r.stderr
        created = json.loads(r.stdout)
        token = created["key"]
        assert g.request("GET", "/v2/models/mlp", key=token).status == 200
        assert g.request("POST", "/v2/models/mlp/infer", b"{}", key=token).status == 403
        ls = run_cli("keys", "--data-dir", str(tmp_path), "ls", "--json")
        listed = {k["id"]: k for k in json.loads(ls.stdout)["keys"]}
        assert created["id"] in listed and token not in ls.stdout
        r = run_cli("keys", "--data-dir", str(tmp_path), "revoke", created["id"])
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30  # the gateway looks for other processes' changes every 0.25 s
        while g.request("GET", "/v2/models/mlp", key=token).status != 401:
            assert time.monotonic() < deadline, "revocation from the CLI never reached the gateway"
            time.sleep(0.05)
        r = run_cli("keys", "--data-dir", str(tmp_path), "revoke", "ffffffffffff")
        assert r.returncode == 1 and "ERR_NOT_FOUND" in r.stderr
        r = run_cli("keys", "--data-dir", str(tmp_path), "create", "--name", "x", "--permissions", "root")
        assert r.returncode == 1 and "unknown permission" in r.stderr
    finally:
        g.close()


def test_auth_off_limits_by_client_address(tmp_path):
    from swarmd.gateway.config import GatewayConfig

    install_model(tmp_path / "models", "mlp", "1", tiny_mlp())
    g = GatewayThread(tmp_path, GatewayConfig(auth=False, rate_limit_rps=0.01, rate_limit_burst=2))
    try:
        assert [g.request("GET", "/v2/models/mlp").status for _ in range(3)] == [200, 200, 429]
        assert g.request("GET", "/v2/models/mlp", key="swd_bad_key").status == 401
    finally:
        g.close()


def test_default_limit_applies_to_keys_without_their_own(tmp_path):
    from swarmd.gateway.config import GatewayConfig

    install_model(tmp_path / "models", "mlp", "1", tiny_mlp())
    g = GatewayThread(tmp_path, GatewayConfig(rate_limit_rps=0.01, rate_limit_burst=2))
    try:
        key = g.key("models:read")
        assert [g.request("GET", "/v2/models/mlp", key=key).status for _ in range(3)] == [200, 200, 429]
        roomy = g.key("models:read", rate_rps=1000.0, rate_burst=1000.0)
        assert [g.request("GET", "/v2/models/mlp", key=roomy).status for _ in range(3)] == [200, 200, 200]
        status = g.request("GET", "/api/v1/status", key=g.admin_key).json()
        assert status["models"] == ["mlp:1"] and status["backend"]["backend"] == "local"
    finally:
        g.close()
