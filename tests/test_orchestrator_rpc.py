"""The orchestrator role over real RPC: real TCP + Noise to real worker peers on loopback."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from orchestrator_peers import Orchestrator, PeerWorker, WorkerProcess, expected

from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, ERR_UNAVAILABLE, SwarmdError

T = 20.0  # generous per-call timeout: the machine is shared


@pytest.fixture
async def workers() -> AsyncIterator[list[PeerWorker]]:
    ws = [await PeerWorker().start() for _ in range(3)]
    yield ws
    for w in ws:
        w._never.set()
        await w.stop()


async def make_orch(tmp_path: Path, **cfg: Any) -> Orchestrator:
    base: dict[str, Any] = {"seed": 3, "health_interval": 3600.0, "health_timeout": 2.0}
    base.update(cfg)
    return await Orchestrator(tmp_path, **base).start()


async def wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_register_find_route_and_report(tmp_path: Path, workers: list[PeerWorker]) -> None:
    orch = await make_orch(tmp_path, policy="round_robin")
    try:
        for w in workers:
            reg = await orch.register(w)
            assert reg["public_key"] == w.public_hex and reg["expires_in"] > 0
        found = await orch.call("findAvailableWorker", {"model": "mlp"})
        assert found["public_key"] in {w.public_hex for w in workers}
        assert found["addresses"] and found["policy"] == "round_robin"
        assert len(found["alternates"]) == 2
        outs = [await orch.infer(i) for i in range(6)]
        assert Counter(o["worker"] for o in outs) == {w.public_hex: 2 for w in workers}
        assert [w.served for w in workers] == [2, 2, 2]

        page = await orch.call("getServiceStatus", {"limit": 2, "offset": 1})
        assert page["workers_total"] == 3
        assert [w["public_key"] for w in page["workers"]] == sorted(w.public_hex for w in workers)[1:3]
        status = await orch.call("getServiceStatus", {})
        assert status["counts"]["routable"] == 3 and status["models"] == {
            "mlp": {"workers": 3, "routable": 3}
        }
        stats = await orch.call("getLoadBalancingStats", {})
        assert stats["policy"] == "round_robin" and stats["decisions"] >= 6
        assert sum(s["successes"] for s in stats["workers"].values()) == 6
        health = await orch.call("healthCheck", {"refresh": True})
        assert health["status"] == "ok" and all(h["last_check_ok"] for h in health["workers"].values())

        gone = await orch.call("unregisterWorker", {"public_key": workers[0].public_hex})
        assert gone["removed"] is True
        assert {(await orch.infer())["worker"] for _ in range(4)} == {
            workers[1].public_hex,
            workers[2].public_hex,
        }
    finally:
        await orch.stop()


async def test_errors_are_precise(tmp_path: Path, workers: list[PeerWorker]) -> None:
    orch = await make_orch(tmp_path)
    try:
        with pytest.raises(SwarmdError) as ei:
            await orch.call("routeInferenceRequest", {"model": "mlp", "inputs": {}})
        # no worker known at all: the model may exist, nobody can run it now
        assert ei.value.code == ERR_UNAVAILABLE and "'mlp'" in ei.value.message
        with pytest.raises(SwarmdError) as ei:
            await orch.call("registerWorker", {"public_key": "ab", "models": ["mlp"]})
        assert ei.value.code == ERR_BAD_REQUEST and "public_key" in ei.value.message
        with pytest.raises(SwarmdError) as ei:
            await orch.call("findAvailableWorker", {})
        assert ei.value.code == ERR_BAD_REQUEST
        await orch.register(workers[0])
        # A caller error from the worker comes back as the worker said it, unretried.
        with pytest.raises(SwarmdError) as ei:
            await orch.call(
                "routeInferenceRequest", {"model": "mlp", "inputs": {"x": np.zeros((1, 3), np.int64)}}
            )
        assert ei.value.code == ERR_BAD_REQUEST and "float32" in ei.value.message
        assert (await orch.call("healthCheck", {}))["status"] == "ok"  # the worker is not blamed
    finally:
        await orch.stop()


async def test_least_connections_follows_in_flight_over_rpc(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    orch = await make_orch(tmp_path, policy="least_connections")
    try:
        for w in workers:
            await orch.register(w)
            w.gate = asyncio.Event()
        # Nine calls held open by the workers: each choice sees the live in-flight counts, so 3/3/3.
        held = [asyncio.ensure_future(orch.infer(i)) for i in range(9)]
        await wait_for(lambda: sum(w.in_flight for w in workers) == 9, "nine calls in flight")
        assert [w.in_flight for w in workers] == [3, 3, 3]
        # Two workers finish theirs; the third still holds three, so new calls avoid it.
        slow = workers[0]
        for w in workers[1:]:
            w.gate.set()  # type: ignore[union-attr]
        await wait_for(lambda: sum(w.in_flight for w in workers) == 3, "two workers drained")
        outs = [await orch.infer(i) for i in range(8)]
        assert slow.public_hex not in {o["worker"] for o in outs}
        slow.gate.set()  # type: ignore[union-attr]
        results = await asyncio.gather(*held)
        assert Counter(o["worker"] for o in results) == {w.public_hex: 3 for w in workers}
    finally:
        await orch.stop()


async def test_killed_worker_process_loses_no_request_under_load(tmp_path: Path) -> None:
    procs = [WorkerProcess.spawn() for _ in range(3)]
    # round_robin: the victim surely gets calls after it dies (p2c may starve a slow worker of them)
    # connect_timeout 10 s (default 2): a loaded machine can take seconds to finish a Noise handshake with
    # a live worker process, and two such timeouts would eject it; the killed one refuses at once anyway.
    orch = await make_orch(tmp_path, policy="round_robin", eject_after=2, connect_timeout=10.0)
    try:
        for p in procs:
            await orch.register(p)
        total, concurrency = 240, 8
        done: list[dict[str, Any]] = []
        killed = asyncio.Event()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)

        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                done.append(await orch.infer(i))
                if len(done) == total // 3 and not killed.is_set():
                    killed.set()
                    procs[0].kill()

        await asyncio.gather(*(client() for _ in range(concurrency)))
        assert killed.is_set()
        assert len(done) == total  # every request answered, with the right numbers (checked in infer)
        # The kill did hit routed calls (so "nothing lost" means something): they failed there and were retried.
        stats = await orch.call("getLoadBalancingStats", {})
        assert stats["workers"][procs[0].public_hex]["failures"] >= 1
        assert stats["retries"] >= stats["workers"][procs[0].public_hex]["failures"]
        assert sum(s["successes"] for s in stats["workers"].values()) == total
    finally:
        await orch.stop()
        for p in procs:
            p.kill()


async def test_hung_worker_is_ejected_traffic_moves_and_it_is_readmitted(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    # 1 s bounds: the hung worker still times out every time, and the live ones (same loaded
    # process) answer well inside them even when the machine is busy (0.3 s was within reach of a stall)
    orch = await make_orch(
        tmp_path, policy="round_robin", eject_after=2, attempt_timeout=1.0, health_timeout=1.0
    )
    try:
        for w in workers:
            await orch.register(w)
        hung = workers[0]
        hung.hung = True
        # Requests still all succeed: the ones that land on the hung worker time out and move on.
        outs = [await orch.infer(i) for i in range(9)]
        assert hung.public_hex not in {o["worker"] for o in outs}
        await orch.call("healthCheck", {"refresh": True})
        health = await orch.call("healthCheck", {})
        assert health["workers"][hung.public_hex]["healthy"] is False
        assert health["ejected"] == 1
        outs = [await orch.infer(i) for i in range(6)]
        assert hung.public_hex not in {o["worker"] for o in outs}
        # It comes back: the next passing check re-admits it and it gets traffic again.
        hung.hung = False
        hung._never.set()
        hung._never = asyncio.Event()
        health = await orch.call("healthCheck", {"refresh": True})
        assert health["workers"][hung.public_hex]["healthy"] is True
        outs = [await orch.infer(i) for i in range(6)]
        assert hung.public_hex in {o["worker"] for o in outs}
    finally:
        await orch.stop()


async def test_lease_expires_when_a_worker_vanishes_without_unregistering(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    # ttl 2 s, not 1: a renewal must come within one ttl, and a loaded machine can stall a round for a second
    orch = await make_orch(tmp_path, health_interval=0.05, health_timeout=1.0)
    try:
        await orch.register(workers[0], ttl=2)
        await orch.register(workers[1], ttl=2)
        role = orch.role
        # Passing checks renew a live worker's lease: both outlive their 2 s registration.
        rounds = role.monitor.rounds
        await wait_for(lambda: role.monitor.rounds >= rounds + 2, "two check rounds")
        t0 = role.balancer.clock()
        await wait_for(lambda: role.balancer.clock() > t0 + 2.5, "past the registration ttl")
        assert (await orch.call("getServiceStatus", {}))["counts"]["total"] == 2
        # workers[0] vanishes without a word: checks fail, nothing renews its lease, it expires.
        await workers[0].stop()

        def expired() -> bool:
            return workers[0].public_hex not in role.balancer.registry

        await wait_for(expired, "lease expiry")
        found = {(await orch.call("findAvailableWorker", {"model": "mlp"}))["public_key"] for _ in range(10)}
        assert found == {workers[1].public_hex}
        await orch.call("unregisterWorker", {"public_key": workers[1].public_hex})
        with pytest.raises(SwarmdError) as ei:
            await orch.call("findAvailableWorker", {"model": "mlp"})
        assert ei.value.code == ERR_UNAVAILABLE  # no worker left at all: nobody to run it, not "no such model"
    finally:
        await orch.stop()


async def test_draining_worker_gets_no_traffic(tmp_path: Path, workers: list[PeerWorker]) -> None:
    orch = await make_orch(tmp_path)
    try:
        for w in workers[:2]:
            await orch.register(w)
        workers[0].state = "DRAINING"
        await orch.call("healthCheck", {"refresh": True})
        assert {(await orch.infer())["worker"] for _ in range(8)} == {workers[1].public_hex}
        workers[1].state = "DRAINING"
        await orch.call("healthCheck", {"refresh": True})
        with pytest.raises(SwarmdError) as ei:
            await orch.infer()
        assert ei.value.code == ERR_UNAVAILABLE and "2 draining" in ei.value.message
    finally:
        await orch.stop()


async def test_a_model_no_worker_has_loaded_goes_to_one_worker_that_can_load_it(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    orch = await make_orch(tmp_path, policy="round_robin")
    try:
        for w in workers:
            await orch.register(w)
        x = np.ones((1, 4), dtype=np.float32)
        # "cnn" exists nowhere: exactly one worker is asked, its precise answer comes back.
        with pytest.raises(SwarmdError) as ei:
            await orch.call("routeInferenceRequest", {"model": "cnn", "inputs": {"x": x}})
        assert ei.value.code == ERR_NOT_FOUND and "is not loaded here" in ei.value.message
        stats = await orch.call("getLoadBalancingStats", {})
        assert sum(s["rejected"] for s in stats["workers"].values()) == 1
        # A worker that can fetch "cnn" from a store serves it on first use.
        for w in workers:
            w.loadable.add("cnn")
        out = await orch.call("routeInferenceRequest", {"model": "cnn", "inputs": {"x": x}})
        np.testing.assert_allclose(out["outputs"]["y"], expected(x))
        found = await orch.call("findAvailableWorker", {"model": "cnn"})
        assert found["public_key"] in {w.public_hex for w in workers}
    finally:
        await orch.stop()


async def test_route_unloaded_off_keeps_unknown_models_not_found(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    orch = await make_orch(tmp_path, route_unloaded=False)
    try:
        await orch.register(workers[0])
        workers[0].loadable.add("cnn")
        with pytest.raises(SwarmdError) as ei:
            await orch.call("routeInferenceRequest", {"model": "cnn", "inputs": {}})
        assert (
            ei.value.code == ERR_NOT_FOUND and "no registered worker serves model 'cnn'" in ei.value.message
        )
        assert workers[0].served == 0
    finally:
        await orch.stop()


async def test_a_socket_that_accepts_and_never_speaks_is_ejected(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    """Hung below RPC: TCP accepts, the Noise handshake never completes."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # keep it open, say nothing

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    orch = await make_orch(
        tmp_path,
        policy="round_robin",
        eject_after=2,
        connect_timeout=1.0,  # the mute socket times out every time; the live worker connects well inside it
        attempt_timeout=2.0,
        health_timeout=1.0,
    )
    try:
        mute_key = "ab" * 32
        await orch.call(
            "registerWorker", {"public_key": mute_key, "models": ["mlp"], "host": "127.0.0.1", "port": port}
        )
        await orch.register(workers[0])
        outs = [await orch.infer(i) for i in range(4)]
        assert {o["worker"] for o in outs} == {workers[0].public_hex}
        await orch.call("healthCheck", {"refresh": True})
        health = await orch.call("healthCheck", {})
        assert health["workers"][mute_key]["healthy"] is False
        assert health["workers"][mute_key]["last_error"] == "ERR_TIMEOUT"
    finally:
        await orch.stop()
        for w in held:
            w.close()
        silent.close()
        await silent.wait_closed()


async def test_a_peer_that_closes_during_the_handshake_costs_no_request(
    tmp_path: Path, workers: list[PeerWorker]
) -> None:
    """Issue 17: `HandshakeFailed: ERR_HANDSHAKE … connection closed during the handshake` (a
    worker that died or restarted under us) moves the request to another worker; it is one of
    the retryable classes the gateway, the orchestrator and swarmd_rpc share."""
    from swarmd.errors import retryable

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # accepted, then gone before the handshake could finish

    closer = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = closer.sockets[0].getsockname()[1]
    orch = await make_orch(tmp_path, policy="round_robin", eject_after=100)
    try:
        cut_key = "cd" * 32
        await orch.call(
            "registerWorker", {"public_key": cut_key, "models": ["mlp"], "host": "127.0.0.1", "port": port}
        )
        await orch.register(workers[0])
        outs = [await orch.infer(i) for i in range(4)]  # round robin sends some to the cut peer first
        assert {o["worker"] for o in outs} == {workers[0].public_hex}
        health = await orch.call("healthCheck", {})
        code = health["workers"][cut_key]["last_error"]
        assert health["workers"][cut_key]["consecutive_failures"] >= 1
        assert retryable(SwarmdError(code, "")), code
        print(f"a peer closing mid-handshake: the dial fails as {code}; the request went elsewhere")
    finally:
        await orch.stop()
        closer.close()
        await closer.wait_closed()
