"""gateway/deadlines.py: one timer for every inference's gateway.infer_timeout (issue 20).

Real tasks on a real loop; the deadlines are short but no assertion depends on how long
anything took, only on which task timed out and which did not."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from swarmd.errors import ERR_TIMEOUT, SwarmdError
from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.deadlines import Deadlines
from swarmd.gateway.keys import KeyStore
from swarmd.gateway.local import LocalBackend
from swarmd.gateway.server import Gateway
from tests.gateway_fixtures import install_model, tiny_mlp


async def _bounded(d: Deadlines, wait: asyncio.Event) -> str:
    """What Gateway.infer does around the backend call."""
    entry = d.enter()
    try:
        await wait.wait()
        return "done"
    except asyncio.CancelledError:
        if d.expired(entry):
            return "timed out"
        raise
    finally:
        d.leave(entry)


async def test_only_the_late_task_times_out_and_outside_cancels_still_cancel():
    d = Deadlines(0.05)
    never, soon = asyncio.Event(), asyncio.Event()
    late = asyncio.create_task(_bounded(d, never))
    quick = asyncio.create_task(_bounded(d, soon))
    cancelled = asyncio.create_task(_bounded(d, never))
    await asyncio.sleep(0)
    soon.set()
    cancelled.cancel()
    assert await quick == "done"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await asyncio.wait_for(late, 30) == "timed out"
    assert not d._queue and d._live == 0


async def test_finished_entries_do_not_pile_up_behind_a_slow_one():
    d = Deadlines(30.0)
    never = asyncio.Event()
    slow = asyncio.create_task(_bounded(d, never))
    await asyncio.sleep(0)
    done = asyncio.Event()
    done.set()
    for _ in range(5000):
        assert await asyncio.create_task(_bounded(d, done)) == "done"
    assert len(d._queue) <= 2 * d._live + 64 + 1
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    d.close()


async def test_gateway_infer_answers_err_timeout_past_infer_timeout(tmp_path):
    """A model run that outlasts gateway.infer_timeout: its request is answered ERR_TIMEOUT,
    and the gateway serves the next one."""
    install_model(tmp_path / "models", "mlp", "1", tiny_mlp())
    backend = LocalBackend(tmp_path / "models", pool_size=1)
    await backend.start()
    keys = KeyStore(tmp_path / "keys.sqlite")
    gw = Gateway(GatewayConfig(infer_timeout=0.05), backend, keys, data_dir=tmp_path)
    blocker = threading.Event()
    runtime = backend._get("mlp", None).runtime
    real_run = runtime.run

    def held_run(*args):  # the model run outlasts the budget
        blocker.wait(30)
        return real_run(*args)

    runtime.run = held_run
    x = np.zeros((1, 4), np.float32)
    try:
        with pytest.raises(SwarmdError) as e:
            await gw.infer("mlp", None, {"x": x}, None, "r1")
        assert e.value.code == ERR_TIMEOUT
    finally:
        blocker.set()
        runtime.run = real_run
    result = await asyncio.wait_for(gw.infer("mlp", None, {"x": x}, None, "r2"), 30)
    assert result.model == "mlp"
    await gw.stop()
    await backend.stop()
    keys.close()


async def test_a_deadline_cancel_the_backend_swallowed_is_taken_back():
    """Like asyncio.timeout: if the work under a deadline catches the cancel and finishes, the
    task is left with no cancellation pending (later timeouts in the same task still work)."""
    d = Deadlines(0.05)
    never = asyncio.Event()

    async def swallowing() -> tuple[str, int]:
        entry = d.enter()
        try:
            try:
                await never.wait()
            except asyncio.CancelledError:
                pass  # the backend shrugs it off
            return "finished", 0
        finally:
            d.leave(entry)

    async def run() -> tuple[str, int]:
        out = await swallowing()
        return out[0], asyncio.current_task().cancelling()

    assert await asyncio.wait_for(asyncio.create_task(run()), 30) == ("finished", 0)


async def test_a_deadline_on_a_future_cancels_it_and_says_why():
    """Gateway.infer_soon's way: the entry guards a backend future, not a task."""
    d = Deadlines(0.05)
    loop = asyncio.get_running_loop()
    late, quick, gone = loop.create_future(), loop.create_future(), loop.create_future()
    entries = {f: d.enter(f) for f in (late, quick, gone)}
    quick.set_result("done")
    gone.cancel()  # cancelled from outside (its client went away)
    await asyncio.wait_for(asyncio.wait([late]), 30)
    assert late.cancelled()
    assert d.expired(entries[late]) and not d.expired(entries[quick]) and not d.expired(entries[gone])
    for entry in entries.values():
        d.leave(entry)
    assert not d._queue and d._live == 0
    d.close()
