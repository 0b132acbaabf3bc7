"""The active health loop over in-process async workers: eject on silence, re-admit on answer, expire leases."""

from __future__ import annotations

import asyncio
from typing import Any

from swarmd.errors import ERR_TIMEOUT, ERR_UNKNOWN_METHOD, SwarmdError
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.monitor import HealthMonitor
from swarmd.orchestrator.registry import WorkerLease

KEYS = [f"{i:02x}" * 32 for i in range(1, 4)]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Answers:
    def __init__(self) -> None:
        self.hung: set[str] = set()
        self.ping_only: set[str] = set()
        self.state: dict[str, str] = {}
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, lease: WorkerLease, method: str, params: Any, seconds: float) -> Any:
        self.asked.append((lease.public_key, method))
        if lease.public_key in self.hung:
            await asyncio.Event().wait()
        if method == "checkCapacity" and lease.public_key in self.ping_only:
            raise SwarmdError(ERR_UNKNOWN_METHOD, "no such method")
        if method == "ping":
            return "pong"
        return {"state": self.state.get(lease.public_key, "ONLINE"), "in_flight": 1, "queue_depth": 0}


def setup() -> tuple[Balancer, HealthMonitor, Answers, Clock, list[str]]:
    clock = Clock()
    b = Balancer(OrchestratorConfig(eject_after=2, health_timeout=0.05, lease_ttl=10, seed=1), clock=clock)
    for k in KEYS:
        b.registry.upsert(k, models=["mlp"])
    answers = Answers()
    expired: list[str] = []
    return b, HealthMonitor(b, answers, on_expired=lambda k, _: expired.append(k)), answers, clock, expired


async def test_silent_worker_is_ejected_then_readmitted_when_it_answers() -> None:
    b, mon, answers, _, _ = setup()
    answers.hung.add(KEYS[0])
    await mon.tick()
    assert not b.health.is_ejected(KEYS[0])
    await mon.tick()
    assert b.health.is_ejected(KEYS[0])
    assert b.health.record(KEYS[0]).last_error == ERR_TIMEOUT
    assert KEYS[0] not in {b.choose("mlp").public_key for _ in range(30)}
    answers.hung.clear()
    await mon.tick()
    assert not b.health.is_ejected(KEYS[0])
    assert KEYS[0] in {b.choose("mlp").public_key for _ in range(60)}
    assert b.registry.get(KEYS[1]).load == {"in_flight": 1, "queue_depth": 0}  # type: ignore[union-attr]


async def test_a_worker_reporting_draining_leaves_routing() -> None:
    b, mon, answers, _, _ = setup()
    answers.state[KEYS[2]] = "DRAINING"
    await mon.tick()
    assert KEYS[2] not in {b.choose("mlp").public_key for _ in range(30)}
    assert not b.health.is_ejected(KEYS[2])


async def test_a_peer_without_checkcapacity_is_pinged_instead() -> None:
    b, mon, answers, _, _ = setup()
    answers.ping_only.add(KEYS[1])
    await mon.tick()
    assert (KEYS[1], "ping") in answers.asked
    assert b.health.record(KEYS[1]).last_check_ok is True


async def test_tick_sweeps_expired_leases() -> None:
    b, mon, answers, clock, expired = setup()
    clock.t += 5
    b.registry.upsert(KEYS[0], models=["mlp"])
    clock.t += 6
    await mon.tick()
    assert expired == [KEYS[1], KEYS[2]]
    assert [lease.public_key for lease in b.registry] == [KEYS[0]]
    assert {k for k, _ in answers.asked} == {KEYS[0]}  # expired workers are not checked


async def test_a_passing_check_renews_the_lease_and_a_failing_one_does_not() -> None:
    b, mon, answers, clock, expired = setup()
    answers.hung.add(KEYS[0])
    for _ in range(3):
        clock.t += 6  # lease_ttl is 10: only checks keep the leases alive
        await mon.tick()
    assert expired == [KEYS[0]]
    assert {lease.public_key for lease in b.registry} == {KEYS[1], KEYS[2]}
