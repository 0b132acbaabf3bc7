"""Choice plus failover around real calls, embeddable anywhere a registry lives.

The orchestrator role routes `routeInferenceRequest` through a Router; a
gateway or the client library can hold their own Router over the same kind of
Balancer and call workers directly, skipping the orchestrator hop. The Router
does no networking itself: it is given a `call(lease, method, params, seconds)`
coroutine function, so the same code runs over swarmd.rpc peers or anything
else that raises SwarmdError with the stable codes. `call` must give up after
`seconds` (swarmd.rpc calls do, by their own timer): the Router sets no timer
of its own, because RPC handlers start inline, outside any Task, where
asyncio.timeout cannot run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from loguru import logger

from swarmd.errors import ERR_NOT_READY, ERR_TIMEOUT, ERR_UNAVAILABLE, SwarmdError
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.failover import Verdict, classify
from swarmd.orchestrator.registry import JOINING, WorkerLease

Caller = Callable[[WorkerLease, str, dict[str, Any], float], Awaitable[Any]]
Sleeper = Callable[[float], Awaitable[Any]]


class Router:
    def __init__(self, balancer: Balancer, call: Caller, *, sleep: Sleeper = asyncio.sleep) -> None:
        self.balancer = balancer
        self.call = call
        self.sleep = sleep
        self.log = logger.bind(part="router")

    async def route(
        self,
        method: str,
        params: dict[str, Any],
        *,
        model: str | None,
        capability: str | None = None,
        budget: float | None = None,
        final_codes: Collection[str] = (),
    ) -> tuple[Any, WorkerLease]:
        """Call `method` on a chosen worker; on a worker-side failure try another.

        Returns (result, the worker that answered). Caller errors (bad request)
        come back at once as the worker raised them; a worker that lacks the
        model or is not ready sends the request to another worker without
        counting against its health; worker failures are retried up to max_attempts within `budget` seconds
        and end in ERR_UNAVAILABLE (or ERR_TIMEOUT) naming the last cause.
        Codes in `final_codes` are handed back at once whatever their class.
        """
        b = self.balancer
        cfg = b.config
        budget = cfg.request_timeout if budget is None else budget
        deadline = time.monotonic() + budget
        tried: list[str] = []
        last: tuple[str, str] | None = None  # (worker, code) of the last failure
        for attempt in range(cfg.max_attempts):
            if attempt:
                b.retries += 1
                pause = min(b.backoff(attempt), max(0.0, deadline - time.monotonic()))
                if pause > 0.0:
                    await self.sleep(pause)
            remaining = deadline - time.monotonic()
            if remaining <= 0.0:
                break
            lease = (
                b.choose(model, capability, exclude=tried)
                if not tried
                else self._rechoose(model, capability, tried)
            )
            if lease is None:
                break
            key = lease.public_key
            tried.append(key)
            per_try = min(cfg.attempt_timeout, remaining)
            started = b.begin(key)
            try:
                result = await self.call(lease, method, params, per_try)
            except asyncio.CancelledError:
                b.abandoned(key)
                raise
            except Exception as e:  # every failure is classified; nothing escapes unaccounted
                verdict, code = classify(e)
                if verdict is Verdict.FINAL or code in final_codes:
                    b.rejected(key, code)
                    raise
                if verdict is Verdict.ELSEWHERE:
                    b.rejected(key, code)
                    if code == ERR_NOT_READY:  # out of routing until a check or record says ONLINE again
                        b.registry.set_state(key, JOINING)
                    if not any(c.public_key not in tried for c in b.candidates(model, capability, tried)):
                        raise  # nobody else to ask: the worker's own answer is the most precise one
                    continue
                outcome = b.failed(key, code, model, capability)
                last = (key, code)
                self.log.bind(
                    event="worker_failed", worker=key[:16], code=code, attempt=attempt + 1, **outcome
                ).info("call {} on worker {} failed with {}; trying another", method, key[:16], code)
                continue
            b.succeeded(key, started)
            return result, lease
        if last is None:
            raise SwarmdError(ERR_TIMEOUT, f"no time left to route {method} within {budget:.3f}s")
        worker, code = last
        raise SwarmdError(
            ERR_UNAVAILABLE,
            f"{method} failed on {len(tried)} attempt(s) over {len(set(tried))} worker(s); "
            f"last: {code} from {worker[:16]}",
            {"attempts": len(tried), "last_code": code},
        )

    def _rechoose(self, model: str | None, capability: str | None, tried: list[str]) -> WorkerLease | None:
        """After a failure there may be nobody left (everyone ejected): stop instead of raising."""
        try:
            return self.balancer.choose(model, capability, exclude=tried)
        except SwarmdError:
            return None
