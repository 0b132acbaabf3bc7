"""Router failover logic with in-process async workers (no network): retries, bans, final errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CLOSED,
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_OVERLOADED,
    ERR_UNAVAILABLE,
    SwarmdError,
)
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.registry import WorkerLease
from swarmd.orchestrator.router import Router

KEYS = [f"{i:02x}" * 32 for i in range(1, 5)]


class Workers:
    """Async callables keyed by worker: each either answers or raises what it is told to."""

    def __init__(self) -> None:
        self.behaviour: dict[str, BaseException | None] = {}
        self.calls: list[str] = []

    async def __call__(self, lease: WorkerLease, method: str, params: dict[str, Any], seconds: float) -> Any:
        self.calls.append(lease.public_key)
        await asyncio.sleep(0)
        exc = self.behaviour.get(lease.public_key)
        if exc is not None:
            raise exc
        return {"by": lease.public_key, "echo": params}


def make(policy: str = "round_robin", **cfg: Any) -> tuple[Balancer, Router, Workers]:
    b = Balancer(OrchestratorConfig(policy=policy, seed=1, backoff_base=0.0, **cfg))  # type: ignore[arg-type]
    for k in KEYS[:3]:
        b.registry.upsert(k, models=["mlp"])
    w = Workers()
    return b, Router(b, w), w


async def test_a_failing_worker_is_retried_elsewhere_and_banned() -> None:
    b, r, w = make()
    w.behaviour[KEYS[0]] = SwarmdError(ERR_CLOSED, "connection closed")
    result, lease = await r.route("runInference", {"x": 1}, model="mlp")
    assert w.calls == [KEYS[0], KEYS[1]]
    assert lease.public_key == KEYS[1] and result["by"] == KEYS[1]
    assert b.bans.is_banned(KEYS[0])
    assert b.stats.get(KEYS[0]).failures == 1 and b.stats.get(KEYS[1]).successes == 1
    assert b.retries == 1
    w.calls.clear()
    for _ in range(6):
        await r.route("runInference", {}, model="mlp")
    assert KEYS[0] not in w.calls  # banned workers sit out while others serve


async def test_connection_refused_counts_as_a_worker_failure() -> None:
    b, r, w = make()
    w.behaviour[KEYS[0]] = ConnectionRefusedError(111, "refused")
    _, lease = await r.route("runInference", {}, model="mlp")
    assert lease.public_key == KEYS[1]
    assert b.stats.get(KEYS[0]).last_error == ERR_CLOSED


async def test_caller_errors_come_back_unretried() -> None:
    b, r, w = make()
    w.behaviour[KEYS[0]] = SwarmdError(ERR_BAD_REQUEST, "input 'x' must be float32")
    with pytest.raises(SwarmdError) as ei:
        await r.route("runInference", {}, model="mlp")
    assert ei.value.code == ERR_BAD_REQUEST
    assert w.calls == [KEYS[0]]
    assert b.stats.get(KEYS[0]).rejected == 1 and not b.bans.is_banned(KEYS[0])


async def test_every_worker_failing_ends_in_unavailable_after_max_attempts() -> None:
    b, r, w = make(max_attempts=5)
    for k in KEYS[:3]:
        w.behaviour[k] = SwarmdError(ERR_OVERLOADED, "queue full")
    with pytest.raises(SwarmdError) as ei:
        await r.route("runInference", {}, model="mlp")
    assert ei.value.code == ERR_UNAVAILABLE
    assert "5 attempt(s) over 3 worker(s)" in ei.value.message and ERR_OVERLOADED in ei.value.message
    assert len(w.calls) == 5
    # Of three failing workers at most two are banned: the last candidate never is.
    assert sum(b.bans.is_banned(k) for k in KEYS[:3]) == 2


async def test_a_hung_worker_times_out_and_the_request_moves_on() -> None:
    b, r, w = make(attempt_timeout=0.05)
    hang = asyncio.Event()

    async def caller(lease: WorkerLease, method: str, params: dict[str, Any], seconds: float) -> Any:
        if lease.public_key == KEYS[0]:
            await asyncio.wait_for(hang.wait(), seconds)  # a caller bounds its own wait, as RPC calls do
        return lease.public_key

    r.call = caller
    result, _ = await r.route("runInference", {}, model="mlp")
    assert result == KEYS[1]
    assert b.stats.get(KEYS[0]).failures == 1 and b.stats.get(KEYS[0]).in_flight == 0


async def test_cancelling_a_routed_call_leaves_no_in_flight_count() -> None:
    b, r, _ = make()
    started = asyncio.Event()

    async def caller(lease: WorkerLease, method: str, params: dict[str, Any], seconds: float) -> Any:
        started.set()
        await asyncio.Event().wait()

    r.call = caller
    task = asyncio.ensure_future(r.route("runInference", {}, model="mlp"))
    await started.wait()
    assert b.stats.get(KEYS[0]).in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.stats.get(KEYS[0]).in_flight == 0


async def test_a_worker_without_the_model_sends_the_request_elsewhere_unblamed() -> None:
    b, r, w = make()
    w.behaviour[KEYS[0]] = SwarmdError(ERR_NOT_FOUND, "model 'mlp' version '2' is not loaded here")
    w.behaviour[KEYS[1]] = SwarmdError(ERR_NOT_READY, "draining")
    _, lease = await r.route("runInference", {}, model="mlp")
    assert lease.public_key == KEYS[2] and w.calls == KEYS[:3]
    assert b.health.record(KEYS[0]).consecutive_failures == 0 and not b.bans.is_banned(KEYS[0])
    assert b.registry.get(KEYS[1]).state == "JOINING"  # type: ignore[union-attr]  # out until a check says ONLINE
    w.behaviour[KEYS[2]] = SwarmdError(ERR_NOT_FOUND, "model 'mlp' version '2' is not loaded here")
    with pytest.raises(SwarmdError) as ei:  # nobody has it: the worker's precise answer comes back
        await r.route("runInference", {}, model="mlp")
    assert ei.value.code == ERR_NOT_FOUND and "version '2'" in ei.value.message
