"""Fleet membership from DHT worker records: leases renewed by records, dead workers' leftovers ignored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.fleet import Fleet

KEYS = [bytes([i]) * 32 for i in range(1, 4)]


@dataclass
class Record:
    """The fields of swarmd.dht PeerRecord that the fleet reads."""

    public_key: bytes
    payload: Any
    seq: int = 1
    addresses: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 7000)])


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def fleet(**cfg: Any) -> tuple[Fleet, Clock]:
    clock = Clock()
    config = OrchestratorConfig(seed=1, dht_lease_ttl=10, eject_after=1, **cfg)
    return Fleet(config, balancer=Balancer(config, clock=clock), health_checks=False), clock


def online(models: list[str], **extra: Any) -> dict[str, Any]:
    return {"state": "ONLINE", "models": models, "load": {"queue": 0, "in_flight": 0}, **extra}


def test_records_fill_the_registry_by_model_and_state() -> None:
    f, _ = fleet()
    n = f.ingest_records(
        [
            Record(KEYS[0], online(["mlp", "cnn"])),
            Record(KEYS[1], {**online(["mlp"]), "state": "JOINING"}),
            Record(KEYS[2], "garbage"),
        ]
    )
    assert n == 2 and f.bad_records == 1
    b = f.balancer
    assert {lease.public_key for lease in b.registry.matching("mlp")} == {KEYS[0].hex(), KEYS[1].hex()}
    assert [lease.public_key for lease in b.candidates("mlp")] == [KEYS[0].hex()]
    lease = b.registry.get(KEYS[0].hex())
    assert lease is not None and lease.sources == {"dht"} and lease.addresses == [("127.0.0.1", 7000)]


def test_a_vanished_worker_ages_out_and_its_leftover_record_does_not_revive_it() -> None:
    f, clock = fleet()
    b = f.balancer
    f.ingest_records([Record(KEYS[0], online(["mlp"]), seq=5), Record(KEYS[1], online(["mlp"]), seq=1)])
    # KEYS[0] dies: checks fail and eject it; its record stays on the DHT unchanged.
    b.check_failed(KEYS[0].hex(), "ERR_UNAVAILABLE")
    for _ in range(3):
        clock.t += 4
        f.ingest_records([Record(KEYS[0], online(["mlp"]), seq=5), Record(KEYS[1], online(["mlp"]), seq=1)])
    ejected = set(b.health.ejected)
    for key in b.expire():
        f._expired(key, key in ejected)
    assert KEYS[0].hex() not in b.registry  # not renewed by its stale record
    assert KEYS[1].hex() in b.registry  # a healthy worker's unchanged record keeps renewing it
    f.ingest_records([Record(KEYS[0], online(["mlp"]), seq=5)])
    assert KEYS[0].hex() not in b.registry and f.stale_records >= 4
    # It comes back and announces again (higher seq): registered again.
    f.ingest_records([Record(KEYS[0], online(["mlp"]), seq=6)])
    assert KEYS[0].hex() in b.registry and not b.health.is_ejected(KEYS[0].hex())


def test_a_healthy_worker_whose_lease_lapsed_comes_back_with_the_same_record() -> None:
    f, clock = fleet()
    f.ingest_records([Record(KEYS[0], online(["mlp"]), seq=2)])
    clock.t += 11  # lookups failed for a while: the lease lapsed, but the worker was never ejected
    for key in f.balancer.expire():
        f._expired(key, False)
    f.ingest_records([Record(KEYS[0], online(["mlp"]), seq=2)])
    assert KEYS[0].hex() in f.balancer.registry


def test_orchestrators_share_nothing_but_the_records() -> None:
    records = [Record(k, online(["mlp"])) for k in KEYS]
    a, _ = fleet(policy="round_robin")
    b, _ = fleet(policy="round_robin")
    a.ingest_records(records)
    b.ingest_records(records)
    a.balancer.check_failed(KEYS[0].hex(), "ERR_TIMEOUT")  # a's view of KEYS[0] only
    assert KEYS[0].hex() not in {a.balancer.choose("mlp").public_key for _ in range(6)}
    assert KEYS[0].hex() in {b.balancer.choose("mlp").public_key for _ in range(6)}


async def test_a_worker_that_served_an_unlisted_model_is_routed_to_directly_next_time() -> None:
    calls: list[tuple[str, str | None]] = []

    async def call(lease: Any, method: str, params: dict[str, Any], seconds: float) -> Any:
        calls.append((lease.public_key, params.get("model")))
        return {"model": params["model"], "outputs": {}}

    config = OrchestratorConfig(seed=1, dht_lease_ttl=10)
    f = Fleet(config, balancer=Balancer(config, clock=Clock()), health_checks=False, call=call)
    f.ingest_records([Record(KEYS[0], online([]))])  # it will load "mlp" on its first request
    assert f.balancer.candidates("mlp") == []
    _, lease = await f.route("runInference", {"model": "mlp"}, model="mlp")
    assert lease.public_key == KEYS[0].hex() and calls == [(KEYS[0].hex(), "mlp")]
    # Learned: the registry now lists the model for that worker, so no unknown-model detour.
    assert [lease.public_key for lease in f.balancer.candidates("mlp")] == [KEYS[0].hex()]
    await f.route("runInference", {"model": "mlp"}, model="mlp")
    assert len(calls) == 2
    # The worker's own record stays the authority: a renewal replaces what it serves.
    f.ingest_records([Record(KEYS[0], online(["cnn"]), seq=2)])
    assert f.balancer.candidates("mlp") == []
    # A method that says nothing about serving the model teaches nothing.
    await f.route("getHealth", {"model": "mlp"}, model="mlp")
    assert f.balancer.candidates("mlp") == []


@dataclass
class Published:
    """An ORCHESTRATORS record: the fields the fleet reads of it."""

    public_key: bytes
    payload: Any


def test_a_worker_an_orchestrator_published_as_ejected_is_tried_only_when_nobody_else_is_left() -> None:
    f, _ = fleet(policy="round_robin")
    b = f.balancer
    f.ingest_records([Record(k, online(["mlp"])) for k in KEYS[:2]])
    dead, alive = KEYS[0].hex(), KEYS[1].hex()
    f.ingest_verdicts([Published(b"\x09" * 32, {"ejected": [dead[:16]]})])
    assert set(b.suspects) == {dead} and "ejected by orchestrator 0909" in b.suspects[dead]
    assert {b.choose("mlp").public_key for _ in range(6)} == {alive}
    assert b.worker_view(b.registry.get(dead))["suspect"].startswith("ejected by orchestrator")
    # the last candidate still gets its chance: advice from others never empties the pool
    assert b.choose("mlp", exclude=[alive]).public_key == dead
    # the orchestrator re-admitted it (its next record does not list it): routed again
    f.ingest_verdicts([Published(b"\x09" * 32, {"ejected": []})])
    assert b.suspects == {} and {b.choose("mlp").public_key for _ in range(6)} == {dead, alive}


def test_a_worker_whose_live_record_stopped_being_refreshed_is_avoided() -> None:
    f, _ = fleet(policy="round_robin", stale_after=8.0)
    b = f.balancer
    now = b.wall()

    def signed(key: bytes, ago: float, ttl: float = 12.0) -> Record:
        rec = Record(key, online(["mlp"]), seq=int((now - ago) * 1000))
        rec.expiry = now - ago + ttl  # type: ignore[attr-defined]
        return rec

    f.ingest_records([signed(KEYS[0], 10.0), signed(KEYS[1], 1.0), signed(KEYS[2], 30.0, ttl=1200.0)])
    dead = KEYS[0].hex()
    # missed two refreshes of a 12 s record: suspect; a 20-minute record 30 s old is just old
    assert set(b.suspects) == {dead} and b.suspects[dead] == "record not refreshed for 10s"
    assert dead not in {b.choose("mlp").public_key for _ in range(9)}
    # a refreshed record (the node was only slow) clears it
    f.ingest_records([signed(KEYS[0], 0.5)])
    assert b.suspects == {}


def test_a_suspect_that_answers_a_call_is_trusted_again() -> None:
    f, _ = fleet()
    b = f.balancer
    f.ingest_records([Record(KEYS[0], online(["mlp"]))])
    key = KEYS[0].hex()
    f.ingest_verdicts([Published(b"\x09" * 32, {"ejected": [key[:16]]})])
    assert key in b.suspects
    b.succeeded(key, b.begin(key))
    assert b.suspects == {}


def test_health_view_names_ejected_and_suspected_workers() -> None:
    """What the gateway's dashboard shows of its router: its own ejections and others' verdicts."""
    f, _ = fleet()
    b = f.balancer
    f.ingest_records([Record(k, online(["mlp"])) for k in KEYS])
    b.check_failed(KEYS[0].hex(), "ERR_CLOSED")  # eject_after=1: ejected by this fleet
    f.ingest_verdicts([Published(b"\x09" * 32, {"ejected": [KEYS[1].hex()[:16]]})])
    view = f.health_view()
    assert view[KEYS[0].hex()]["ejected"] is True and view[KEYS[0].hex()]["suspect"] is None
    assert view[KEYS[1].hex()]["ejected"] is False
    assert view[KEYS[1].hex()]["suspect"].startswith("ejected by orchestrator 0909")
    assert KEYS[2].hex() not in view  # nothing known about it: nothing to show


def test_an_orchestrator_ignores_its_own_published_verdicts() -> None:
    from swarmd.node.identity import Identity

    me = Identity.generate()
    config = OrchestratorConfig(seed=1, dht_lease_ttl=10, eject_after=1)
    f = Fleet(config, me, balancer=Balancer(config), health_checks=False)
    f.ingest_records([Record(KEYS[0], online(["mlp"]))])
    f.ingest_verdicts([Published(me.public_key, {"ejected": [KEYS[0].hex()[:16]]})])
    assert f.balancer.suspects == {}  # its own tracker re-admitted it since; the record lags
    f.ingest_verdicts([Published(b"\x09" * 32, {"ejected": [KEYS[0].hex()[:16]]})])
    assert set(f.balancer.suspects) == {KEYS[0].hex()}


async def test_discovery_does_not_wait_for_a_slow_or_failing_verdict_lookup() -> None:
    """Verdicts are advice: a swarm whose ORCHESTRATORS lookup crawls on (none announce) or
    fails must not hold up the workers' membership, and a failed look keeps the last verdicts."""
    import asyncio

    from swarmd.errors import ERR_UNAVAILABLE, SwarmdError
    from swarmd.topics import ORCHESTRATORS, WORKERS

    mode = {"orchestrators": "hang"}

    async def lookup(topic: str, seconds: float) -> list[Any]:
        if topic == WORKERS:
            return [Record(KEYS[0], online(["mlp"])), Record(KEYS[1], online(["mlp"]))]
        assert topic == ORCHESTRATORS
        if mode["orchestrators"] == "hang":
            await asyncio.sleep(3600)
        if mode["orchestrators"] == "fail":
            raise SwarmdError(ERR_UNAVAILABLE, "no DHT node answered")
        return [Published(b"\x09" * 32, {"ejected": [KEYS[0].hex()[:16]]})]

    config = OrchestratorConfig(seed=1)
    f = Fleet(config, balancer=Balancer(config), health_checks=False, lookup=lookup)
    async with asyncio.timeout(60):  # a bound the hour-long verdict crawl cannot meet
        assert await f.discover_once(5.0) == 2
    assert f.balancer.suspects == {}
    mode["orchestrators"] = "answer"
    assert await f.discover_once(5.0) == 2
    assert set(f.balancer.suspects) == {KEYS[0].hex()}
    mode["orchestrators"] = "fail"
    assert await f.discover_once(5.0) == 2
    assert set(f.balancer.suspects) == {KEYS[0].hex()}  # the last verdicts stand
