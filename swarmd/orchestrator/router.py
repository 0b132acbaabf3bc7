"""The routing engine: choose a worker, call it, fail over — the only loop that does.

Every caller that runs something on a worker holds a Fleet whose Router runs
this loop: the gateway, the orchestrator role (routeInferenceRequest and
findAvailableWorker), the client library and, through it, the CLI. Nothing
above or below retries a worker call. One request's choice widens in one
order, each step at most once: the workers known to serve the model; a fresh
look at the DHT (`refresh`, when the caller has one); any ONLINE worker, which
loads the model from a store on first use (route_unloaded).

The Router does no networking itself: it is given a `call(lease, method,
params, seconds)` coroutine function that must give up after `seconds`, so
the same code runs over RPC peers, an in-process peer or a test double that
raises SwarmdError with the stable codes. Errors are judged by errors.classify
alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from swarmd.errors import (
    ERR_NOT_FOUND,
    ERR_NOT_READY,
    ERR_TIMEOUT,
    ERR_UNAVAILABLE,
    SwarmdError,
    Unreached,
    Verdict,
    classify,
)
from swarmd.node import tracing
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.registry import JOINING, WorkerLease

Caller = Callable[[WorkerLease, str, dict[str, Any], float], Awaitable[Any]]
Sleeper = Callable[[float], Awaitable[Any]]
# refresh(model, seconds): look the workers up again now; True when anything was found.
Refresher = Callable[[str | None, float], Awaitable[bool]]

# Methods whose success on a worker shows it serves params["model"].
MODEL_METHODS = frozenset({"runInference", "loadModel"})


@dataclass
class _Choice:
    """Where one request's choice stands: who was tried, how far the pool widened."""

    tried: list[str] = field(default_factory=list)
    refreshed: bool = False
    unloaded: bool = False  # the pool is any ONLINE worker: it loads the model from a store


class Router:
    def __init__(
        self,
        balancer: Balancer,
        call: Caller,
        *,
        sleep: Sleeper = asyncio.sleep,
        refresh: Refresher | None = None,
    ) -> None:
        self.balancer = balancer
        self.call = call
        self.sleep = sleep
        self.refresh = refresh
        self.log = logger.bind(part="router")

    async def choose(
        self,
        model: str | None,
        capability: str | None = None,
        exclude: Collection[str] = (),
        budget: float | None = None,
    ) -> WorkerLease:
        """The worker a request should go to (the caller makes the call): route()'s first pick."""
        seconds = self.balancer.config.request_timeout if budget is None else budget
        lease = await self._pick(model, capability, _Choice(list(exclude)), time.monotonic() + seconds)
        assert lease is not None  # the first pick raises instead
        return lease

    async def _pick(
        self, model: str | None, capability: str | None, ch: _Choice, deadline: float, *, first: bool = True
    ) -> WorkerLease | None:
        """The next worker to try, widening the pool when nobody untried is left in it.

        None when nobody at all is left (after failures); on a first pick the
        registry's own reason is raised instead, as precise as it can be.
        """
        b = self.balancer
        reason: SwarmdError | None = None
        while True:
            lease: WorkerLease | None = None
            try:
                lease = b.choose(None if ch.unloaded else model, capability, exclude=ch.tried)
                if lease.public_key not in ch.tried:
                    return lease
            except SwarmdError as e:
                reason = reason or e
            if not ch.refreshed and self.refresh is not None:
                ch.refreshed = True
                if await self.refresh(model, max(0.0, deadline - time.monotonic())):
                    continue
            if not ch.unloaded and model is not None and b.config.route_unloaded:
                ch.unloaded = True
                if any(c.public_key not in ch.tried for c in b.candidates(None, capability, ch.tried)):
                    continue
            if lease is not None:
                return lease  # only workers already tried are left: one gets another chance
            if not first:
                return None
            assert reason is not None
            if len(b.registry) == 0:
                raise SwarmdError(  # the model may well exist: nobody to run it is not "not found"
                    ERR_UNAVAILABLE, f"{reason.message}: no worker is known yet; retry shortly", reason.data
                )
            raise reason

    async def route(
        self,
        method: str,
        params: dict[str, Any],
        *,
        model: str | None,
        capability: str | None = None,
        budget: float | None = None,
        _span: bool = True,
    ) -> tuple[Any, WorkerLease]:
        """Call `method` on a chosen worker; on a worker-side failure try another.

        Returns (result, the worker that answered). Caller errors (bad request)
        come back at once as the worker raised them; a worker that lacks the
        model or is not ready sends the request to another worker without
        counting against its health, and its answer comes back when nobody
        else is left; worker failures are retried up to max_attempts within
        `budget` seconds and end in ERR_UNAVAILABLE (or ERR_TIMEOUT) naming the
        last cause. A worker that could not even be reached (Unreached: dead,
        its record left behind) costs no attempt the first time.
        """
        if tracing.tracer is not None and _span:
            with tracing.span("router.route", attributes={"rpc.method": method, "swarmd.model": model or ""}) as s:
                result, lease = await self.route(method, params, model=model, capability=capability, budget=budget,
                                                 _span=False)
                s.set_attribute("swarmd.worker", lease.public_key)
                return result, lease
        b = self.balancer
        cfg = b.config
        budget = cfg.request_timeout if budget is None else budget
        deadline = time.monotonic() + budget
        ch = _Choice()
        attempts = 0
        last: tuple[str, str] | None = None  # (worker, code) of the last failure
        elsewhere: BaseException | None = None  # the last "not here" answer, if it was the last failure
        pause = False
        while attempts < cfg.max_attempts:
            if ch.tried:
                b.retries += 1
            if pause:
                wait = min(b.backoff(attempts), max(0.0, deadline - time.monotonic()))
                if wait > 0.0:
                    await self.sleep(wait)
            remaining = deadline - time.monotonic()
            if remaining <= 0.0:
                break
            lease = await self._pick(model, capability, ch, deadline, first=not ch.tried)
            if lease is None or (elsewhere is not None and lease.public_key in ch.tried):
                if elsewhere is not None:
                    raise elsewhere  # nobody else to ask: the worker's own answer is the most precise one
                break
            key = lease.public_key
            again = key in ch.tried
            ch.tried.append(key)
            started = b.begin(key)
            try:
                result = await self.call(lease, method, params, min(cfg.attempt_timeout, remaining))
            except asyncio.CancelledError:
                b.abandoned(key)
                raise
            except Exception as e:  # every failure is classified; nothing escapes unaccounted
                verdict, code = classify(e)
                if verdict is Verdict.FINAL or (ch.unloaded and code == ERR_NOT_FOUND):
                    # (a worker that would fetch the model finds it in no store: it exists nowhere)
                    b.rejected(key, code)
                    raise
                if verdict is Verdict.ELSEWHERE:
                    b.rejected(key, code)
                    if code == ERR_NOT_READY:  # out of routing until a check or record says ONLINE again
                        b.registry.set_state(key, JOINING)
                    elsewhere, pause = e, False
                    attempts += 1
                    continue
                outcome = b.failed(key, code, model, capability)
                last, elsewhere = (key, code), None
                unreached = isinstance(e, Unreached) and not again
                attempts += 0 if unreached else 1
                pause = not unreached
                self.log.bind(
                    event="worker_failed", worker=key[:16], code=code, attempt=len(ch.tried), **outcome
                ).info("call {} on worker {} failed with {}; trying another", method, key[:16], code)
                continue
            b.succeeded(key, started)
            if ch.unloaded and model is not None and method in MODEL_METHODS:
                # It answered, so it serves the model now: route the next requests straight to it.
                b.registry.add_model(key, model)
            return result, lease
        if elsewhere is not None:
            raise elsewhere
        if last is None:
            raise SwarmdError(ERR_TIMEOUT, f"no time left to route {method} within {budget:.3f}s")
        worker, code = last
        raise SwarmdError(
            ERR_UNAVAILABLE,
            f"{method} failed on {len(ch.tried)} attempt(s) over {len(set(ch.tried))} worker(s); "
            f"last: {code} from {worker[:16]}",
            {"attempts": len(ch.tried), "last_code": code},
        )
