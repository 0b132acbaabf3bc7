"""The orchestrator's decision core without a network: registry, health, policies, bans."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_HANDSHAKE,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
    Verdict,
    classify,
)
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.failover import BanList, backoff_delay
from swarmd.orchestrator.health import HealthTracker
from swarmd.orchestrator.policies import (
    Candidate,
    LeastConnections,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    Weighted,
    make_policy,
)
from swarmd.orchestrator.registry import DRAINING, JOINING, ONLINE, Registry
from swarmd.orchestrator.stats import StatsBook


class Clock:
    """A hand-turned clock: tests move time, nothing sleeps."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


KEYS = [f"{i:02x}" * 32 for i in range(1, 5)]


def balancer(clock: Clock, **cfg: object) -> Balancer:
    config = OrchestratorConfig(seed=7, **cfg)  # type: ignore[arg-type]
    return Balancer(config, clock=clock, wall=clock)


# -- registry -----------------------------------------------------------------


def test_registry_indexes_by_model_and_capability() -> None:
    reg = Registry(ttl=10, clock=Clock())
    reg.upsert(KEYS[0], models=["mlp", "cnn"], capabilities=["gpu"])
    reg.upsert(KEYS[1], models=["mlp"], capabilities=["cpu"])
    reg.upsert(KEYS[2], models=["cnn"], capabilities=["gpu", "batching"])
    assert [lease.public_key for lease in reg.matching("mlp")] == [KEYS[0], KEYS[1]]
    assert [lease.public_key for lease in reg.matching("mlp", "gpu")] == [KEYS[0]]
    assert [lease.public_key for lease in reg.matching(None, "gpu")] == [KEYS[0], KEYS[2]]
    assert reg.matching("cnn", "cpu") == []
    assert reg.matching("unknown") == []
    # Renewal replaces what a worker serves, and the indexes follow.
    reg.upsert(KEYS[0], models=["cnn"], capabilities=[])
    assert [lease.public_key for lease in reg.matching("mlp")] == [KEYS[1]]
    assert [lease.public_key for lease in reg.matching(None, "gpu")] == [KEYS[2]]
    assert reg.models() == ["cnn", "mlp"]
    assert reg.remove(KEYS[1])
    assert reg.models() == ["cnn"]


def test_lease_expires_unless_renewed() -> None:
    clock = Clock()
    reg = Registry(ttl=10, clock=clock)
    reg.upsert(KEYS[0], models=["mlp"])
    reg.upsert(KEYS[1], models=["mlp"])
    clock.advance(6)
    reg.upsert(KEYS[1], models=["mlp"])  # renewed
    clock.advance(5)
    # KEYS[0] is past its lease: invisible at once, even before expire() sweeps it.
    assert [lease.public_key for lease in reg.routable("mlp")] == [KEYS[1]]
    assert reg.get(KEYS[0]) is None
    assert reg.expire() == [KEYS[0]]
    assert KEYS[0] not in reg
    clock.advance(6)
    assert reg.expire() == [KEYS[1]]
    assert len(reg) == 0 and reg.models() == []


def test_two_sources_keep_a_lease_alive_until_the_later_expiry() -> None:
    clock = Clock()
    reg = Registry(ttl=10, clock=clock)
    reg.upsert(KEYS[0], models=["mlp"], source="dht", ttl=60, addresses=[("127.0.0.1", 9)])
    reg.upsert(KEYS[0], models=["mlp"], source="rpc")  # shorter, must not cut the DHT lease short
    clock.advance(30)
    lease = reg.get(KEYS[0])
    assert lease is not None and lease.sources == {"dht", "rpc"}
    assert lease.addresses == [("127.0.0.1", 9)]  # a renewal without addresses keeps the known ones


def test_joining_and_draining_workers_get_no_traffic() -> None:
    clock = Clock()
    b = balancer(clock)
    b.registry.upsert(KEYS[0], models=["mlp"], state=JOINING)
    b.registry.upsert(KEYS[1], models=["mlp"], state=DRAINING)
    with pytest.raises(SwarmdError) as ei:
        b.choose("mlp")
    assert ei.value.code == ERR_UNAVAILABLE
    assert "1 joining" in ei.value.message and "1 draining" in ei.value.message
    b.registry.upsert(KEYS[2], models=["mlp"], state=ONLINE)
    assert {b.choose("mlp").public_key for _ in range(20)} == {KEYS[2]}


def test_unknown_model_is_not_found() -> None:
    b = balancer(Clock())
    b.registry.upsert(KEYS[0], models=["mlp"], capabilities=["cpu"])
    with pytest.raises(SwarmdError) as ei:
        b.choose("resnet")
    assert ei.value.code == ERR_NOT_FOUND and "'resnet'" in ei.value.message
    with pytest.raises(SwarmdError) as ei:
        b.choose("mlp", "gpu")
    assert ei.value.code == ERR_NOT_FOUND and "'gpu'" in ei.value.message


# -- policies -----------------------------------------------------------------


def cands(n: int, **kw: object) -> list[Candidate]:
    return [Candidate(KEYS[i], **kw) for i in range(n)]  # type: ignore[arg-type]


def test_round_robin_cycles_in_key_order_and_survives_membership_changes() -> None:
    rr = RoundRobin()
    three = cands(3)
    assert [rr.choose(three).public_key for _ in range(6)] == [KEYS[0], KEYS[1], KEYS[2]] * 2
    rr.choose(three)  # KEYS[0]
    # KEYS[1] leaves: the turn passes to the next key rather than restarting.
    assert rr.choose([three[0], three[2]]).public_key == KEYS[2]
    assert rr.choose(cands(4)).public_key == KEYS[3]
    assert rr.choose(cands(4)).public_key == KEYS[0]


def test_random_is_even_and_seeded() -> None:
    rnd = RandomChoice(seed=1)
    counts = Counter(rnd.choose(cands(4)).public_key for _ in range(4000))
    assert set(counts) == set(KEYS)
    assert all(800 <= n <= 1200 for n in counts.values()), counts
    r1, r2 = RandomChoice(seed=3), RandomChoice(seed=3)
    a = [r1.choose(cands(4)).public_key for _ in range(50)]
    b = [r2.choose(cands(4)).public_key for _ in range(50)]
    assert a == b


def test_least_connections_picks_the_fewest_in_flight_and_shares_ties() -> None:
    lc = LeastConnections(seed=2)
    cs = [Candidate(KEYS[0], in_flight=5), Candidate(KEYS[1], in_flight=1), Candidate(KEYS[2], in_flight=1)]
    counts = Counter(lc.choose(cs).public_key for _ in range(400))
    assert set(counts) == {KEYS[1], KEYS[2]}
    assert min(counts.values()) > 100


def test_least_connections_follows_live_in_flight_through_the_balancer() -> None:
    b = balancer(Clock(), policy="least_connections")
    for k in KEYS[:3]:
        b.registry.upsert(k, models=["mlp"])
    # Open calls without finishing them: each choice must land on the idlest worker,
    # so nine open calls spread 3/3/3.
    opened = []
    for _ in range(9):
        lease = b.choose("mlp")
        opened.append((lease.public_key, b.begin(lease.public_key)))
    assert Counter(k for k, _ in opened) == {KEYS[0]: 3, KEYS[1]: 3, KEYS[2]: 3}
    # Finish every call on KEYS[1]: it is now the idlest and gets the next three.
    for k, t in opened:
        if k == KEYS[1]:
            b.succeeded(k, t)
    nxt = []
    for _ in range(3):
        lease = b.choose("mlp")
        b.begin(lease.public_key)
        nxt.append(lease.public_key)
    assert nxt == [KEYS[1]] * 3


def test_weighted_shares_follow_weight_success_and_latency() -> None:
    cs = [
        Candidate(KEYS[0], weight=1.0, ewma_ms=10.0, success_rate=1.0),
        Candidate(KEYS[1], weight=1.0, ewma_ms=20.0, success_rate=1.0),  # twice as slow: half
        Candidate(KEYS[2], weight=2.0, ewma_ms=10.0, success_rate=0.5),  # double weight, half success
    ]
    assert Weighted.shares(cs) == [1.0, 0.5, 1.0]
    w = Weighted(seed=4)
    counts = Counter(w.choose(cs).public_key for _ in range(5000))
    assert 1700 <= counts[KEYS[0]] <= 2300
    assert 750 <= counts[KEYS[1]] <= 1250
    assert 1700 <= counts[KEYS[2]] <= 2300


def test_p2c_prefers_fast_and_idle_workers_but_samples_everyone() -> None:
    p = PowerOfTwo(seed=5)
    cs = [
        Candidate(KEYS[0], ewma_ms=5.0),
        Candidate(KEYS[1], ewma_ms=50.0),
        Candidate(KEYS[2], ewma_ms=5.0, in_flight=20),
    ]
    counts = Counter(p.choose(cs).public_key for _ in range(3000))
    # KEYS[0] wins every pair it is in (2 of 3 pairs); KEYS[1] beats only the busy KEYS[2].
    assert 1800 <= counts[KEYS[0]] <= 2200
    assert 800 <= counts[KEYS[1]] <= 1200
    assert counts[KEYS[2]] == 0


def test_p2c_prices_a_new_worker_at_the_best_known_latency() -> None:
    cs = [Candidate(KEYS[0], ewma_ms=5.0), Candidate(KEYS[1], ewma_ms=None)]
    assert PowerOfTwo.cost(cs[1], 5.0) == PowerOfTwo.cost(cs[0], 5.0)
    busy_new = Candidate(KEYS[1], ewma_ms=None, in_flight=3)
    assert PowerOfTwo(seed=1).choose([cs[0], busy_new]).public_key == KEYS[0]


def test_p2c_retries_a_slow_worker_once_its_latency_sample_is_stale() -> None:
    clock = Clock()
    b = balancer(clock, policy="p2c", lease_ttl=1e6, ewma_ttl=10.0)
    for k in KEYS[:2]:
        b.registry.upsert(k, models=["mlp"])
    for k, ms in ((KEYS[0], 1.0), (KEYS[1], 50.0)):
        t = b.begin(k)
        clock.advance(ms / 1000)
        b.succeeded(k, t)
    # Sequential calls (no in-flight pressure): the slow worker loses every comparison.
    picks = Counter()
    for _ in range(50):
        lease = b.choose("mlp")
        picks[lease.public_key] += 1
        b.succeeded(lease.public_key, b.begin(lease.public_key))
    assert picks == {KEYS[0]: 50}
    # Its sample ages out; priced like the fast one again, it gets tried and resampled.
    clock.advance(11.0)
    for _ in range(50):
        lease = b.choose("mlp")
        picks[lease.public_key] += 1
        b.succeeded(lease.public_key, b.begin(lease.public_key))
    assert picks[KEYS[1]] >= 1


def test_every_policy_is_reachable_by_name_and_unknown_names_fail() -> None:
    for name in ("p2c", "round_robin", "least_connections", "weighted", "random"):
        assert make_policy(name, 1).name == name
    with pytest.raises(ValueError, match="unknown balancing policy 'fastest'"):
        make_policy("fastest")


# -- stats ----------------------------------------------------------------------


def test_stats_track_requests_latency_and_in_flight() -> None:
    clock = Clock()
    book = StatsBook(alpha=0.5, clock=clock, wall=clock)
    t = book.begin(KEYS[0])
    clock.advance(0.010)
    book.success(KEYS[0], t)
    t = book.begin(KEYS[0])
    clock.advance(0.030)
    assert book.get(KEYS[0]).in_flight == 1
    book.success(KEYS[0], t)
    book.begin(KEYS[0])
    book.failure(KEYS[0], ERR_CLOSED)
    st = book.get(KEYS[0])
    assert (st.requests, st.successes, st.failures, st.in_flight) == (3, 2, 1, 0)
    assert st.avg_ms == pytest.approx(20.0)
    assert st.ewma_ms == pytest.approx(20.0)  # 0.5 * 30 + 0.5 * 10
    assert st.last_request == clock.t  # wall time of the latest begin()
    assert st.success_rate == pytest.approx(3 / 5)


# -- health ---------------------------------------------------------------------


def test_consecutive_failures_eject_and_a_passing_check_readmits() -> None:
    clock = Clock()
    b = balancer(clock, eject_after=3, lease_ttl=1e6)
    b.registry.upsert(KEYS[0], models=["mlp"])
    b.registry.upsert(KEYS[1], models=["mlp"])
    assert not b.failed(KEYS[0], ERR_TIMEOUT, "mlp")["ejected"]
    b.succeeded(KEYS[0], b.begin(KEYS[0]))  # a success ends the streak
    assert not b.failed(KEYS[0], ERR_TIMEOUT, "mlp")["ejected"]
    assert not b.check_failed(KEYS[0], ERR_TIMEOUT)  # active and passive failures share the streak
    assert b.failed(KEYS[0], ERR_CLOSED, "mlp")["ejected"]
    clock.advance(1000)  # bans long over: ejection alone keeps it out
    assert {b.choose("mlp").public_key for _ in range(30)} == {KEYS[1]}
    b.succeeded(KEYS[0], b.begin(KEYS[0]))  # a stray late answer does not re-admit
    assert b.health.is_ejected(KEYS[0])
    assert b.check_passed(KEYS[0], {"state": "ONLINE", "accepting": True})
    assert {b.choose("mlp").public_key for _ in range(30)} == {KEYS[0], KEYS[1]}
    assert (b.ejections, b.readmissions) == (1, 1)


def test_last_worker_ejected_means_unavailable() -> None:
    b = balancer(Clock(), eject_after=1)
    b.registry.upsert(KEYS[0], models=["mlp"])
    b.failed(KEYS[0], ERR_CLOSED, "mlp")
    with pytest.raises(SwarmdError) as ei:
        b.choose("mlp")
    assert ei.value.code == ERR_UNAVAILABLE and "1 ejected" in ei.value.message


def test_check_reporting_draining_takes_a_worker_out_without_a_failure() -> None:
    b = balancer(Clock())
    b.registry.upsert(KEYS[0], models=["mlp"])
    b.registry.upsert(KEYS[1], models=["mlp"])
    b.check_passed(KEYS[0], {"state": "DRAINING", "in_flight": 2, "queue_depth": 0})
    assert {b.choose("mlp").public_key for _ in range(20)} == {KEYS[1]}
    assert b.registry.get(KEYS[0]).load == {"in_flight": 2, "queue_depth": 0}  # type: ignore[union-attr]
    assert b.health.record(KEYS[0]).consecutive_failures == 0


def test_health_tracker_rejects_a_zero_threshold() -> None:
    with pytest.raises(ValueError):
        HealthTracker(eject_after=0)


# -- failover -------------------------------------------------------------------


def test_classify_separates_worker_failures_from_caller_errors() -> None:
    # the issue-17 list: refused/closed connections, handshake failures, timeouts, overload
    for code in (ERR_CLOSED, ERR_HANDSHAKE, ERR_TIMEOUT, ERR_OVERLOADED, ERR_UNAVAILABLE):
        assert classify(SwarmdError(code, "x")) == (Verdict.RETRY, code)
    assert classify(SwarmdError(ERR_NOT_READY, "draining"))[0] is Verdict.ELSEWHERE  # another worker, no blame
    assert classify(ConnectionRefusedError()) == (Verdict.RETRY, ERR_CLOSED)
    assert classify(TimeoutError()) == (Verdict.RETRY, ERR_TIMEOUT)
    assert classify(SwarmdError(ERR_BAD_REQUEST, "x")) == (Verdict.FINAL, ERR_BAD_REQUEST)
    assert classify(SwarmdError(ERR_NOT_FOUND, "x"))[0] is Verdict.ELSEWHERE


def test_backoff_grows_and_is_capped() -> None:
    assert backoff_delay(0, 0.01, 0.1) == 0.0
    assert [backoff_delay(n, 0.01, 0.1) for n in (1, 2, 3, 4, 5, 9)] == [0.01, 0.02, 0.04, 0.08, 0.1, 0.1]


def test_bans_grow_expire_and_clear_on_success() -> None:
    clock = Clock()
    bans = BanList(base=1.0, cap=5.0, clock=clock)
    assert [bans.ban(KEYS[0]) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert bans.is_banned(KEYS[0])
    clock.advance(5.0)
    assert not bans.is_banned(KEYS[0])
    assert bans.strikes(KEYS[0]) == 5  # the ban ended, the memory did not: the next one is long again
    bans.clear(KEYS[0])
    assert bans.ban(KEYS[0]) == 1.0


def test_failing_worker_is_banned_but_the_last_candidate_never_is() -> None:
    clock = Clock()
    b = balancer(clock, eject_after=100, ban_base=1.0, ban_max=8.0)
    b.registry.upsert(KEYS[0], models=["mlp"])
    b.registry.upsert(KEYS[1], models=["mlp"])
    assert b.failed(KEYS[0], ERR_OVERLOADED, "mlp")["banned_for"] == 1.0
    assert {b.choose("mlp").public_key for _ in range(20)} == {KEYS[1]}
    # KEYS[1] now fails too, but it is the only unbanned candidate left: no ban.
    assert b.failed(KEYS[1], ERR_OVERLOADED, "mlp")["banned_for"] == 0.0
    assert {b.choose("mlp").public_key for _ in range(20)} == {KEYS[1]}
    clock.advance(1.0)
    assert b.failed(KEYS[0], ERR_OVERLOADED, "mlp")["banned_for"] == 2.0  # growing
    b.succeeded(KEYS[0], b.begin(KEYS[0]))
    assert not b.bans.is_banned(KEYS[0])
    assert b.failed(KEYS[0], ERR_OVERLOADED, "mlp")["banned_for"] == 1.0  # cleared by the success


def test_a_request_avoids_workers_it_already_tried_while_others_remain() -> None:
    b = balancer(Clock(), policy="round_robin")
    for k in KEYS[:2]:
        b.registry.upsert(k, models=["mlp"])
    assert b.choose("mlp", exclude=[KEYS[0]]).public_key == KEYS[1]
    assert b.choose("mlp", exclude=[KEYS[1]]).public_key == KEYS[0]
    # Everyone tried: fall back to them rather than failing the request.
    assert b.choose("mlp", exclude=KEYS[:2]).public_key in KEYS[:2]


# -- config -----------------------------------------------------------------------


def test_config_section_loads_from_file_and_env_and_refuses_nonsense(tmp_path: Path) -> None:
    from swarmd.errors import ConfigError
    from swarmd.node.config import load_settings
    from swarmd.settings import Settings

    cfg = tmp_path / "swarmd.toml"
    cfg.write_text('[orchestrator]\npolicy = "least_connections"\neject_after = 5\n')
    s = load_settings(Settings, config_file=cfg, environ={"SWARMD_ORCHESTRATOR_HEALTH_INTERVAL": "0.5"})
    assert (s.orchestrator.policy, s.orchestrator.eject_after, s.orchestrator.health_interval) == (
        "least_connections",
        5,
        0.5,
    )
    with pytest.raises(ConfigError, match="orchestrator.policy"):
        load_settings(Settings, environ={"SWARMD_ORCHESTRATOR_POLICY": "fastest"})
    with pytest.raises(ConfigError, match="orchestrator.eject_after must be at least 1"):
        load_settings(Settings, environ={"SWARMD_ORCHESTRATOR_EJECT_AFTER": "0"})
    with pytest.raises(ConfigError, match="orchestrator.health_timeout must be above 0"):
        load_settings(Settings, environ={"SWARMD_ORCHESTRATOR_HEALTH_TIMEOUT": "0"})
