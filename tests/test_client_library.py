"""swarmd_rpc against real in-process nodes: DHT, Noise channels, a store, workers, an orchestrator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import swarmd_rpc
from swarmd.daemon import Node
from swarmd.errors import ERR_OVERLOADED, SwarmdError
from swarmd.node.identity import Identity
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.discovery import WorkerAd
from swarmd.orchestrator.fleet import Fleet
from swarmd.rpc import Methods, RpcServer
from swarmd.settings import Settings
from swarmd.topics import WORKERS
from swarmd_rpc import Client, ClientConfig, SyncClient
from tests.store_models import write_model


def settings(data_dir: Path, roles: list[str], bootstrap: list[str] | None = None) -> Settings:
    s = Settings()
    s.trust.open = True  # an open swarm, asked for
    s.node.roles = roles
    s.node.data_dir = data_dir
    s.node.bootstrap = bootstrap or []
    s.worker.announce_interval = 0.5
    return s


async def wait_for(pred: Any, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.1)


@pytest.fixture
async def swarm(tmp_path: Path) -> Any:
    """A bootstrap+store+orchestrator node and two workers, all on 127.0.0.1."""
    first = Node(settings(tmp_path / "a", ["bootstrap", "store", "orchestrator"]))
    ctx = await first.start()
    boot = [f"127.0.0.1:{ctx.ports['dht']}"]
    workers = [Node(settings(tmp_path / f"w{i}", ["worker"], boot)) for i in range(2)]
    wctx = [await w.start() for w in workers]
    yield {"boot": boot, "first": ctx, "workers": wctx, "nodes": [first, *workers]}
    for n in reversed([first, *workers]):
        await n.stop()


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


async def test_push_list_pull_infer_and_errors(swarm: Any, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.onnx", seed=3)
    seen: list[tuple[int, int]] = []
    async with Client(bootstrap=swarm["boot"], config=ClientConfig(discovery_ttl=0.5)) as c:
        meta = await c.models.push(model, "lin", "1", tags=["t"], progress=lambda d, t: seen.append((d, t)))
        assert meta["name"] == "lin" and meta["version"] == "1"
        assert seen[-1][0] == seen[-1][1] == model.stat().st_size
        assert [(m["name"], m["version"]) for m in await c.models.list()] == [("lin", "1")]
        assert (await c.models.get("lin"))["digest"] == meta["digest"]
        out = tmp_path / "pulled.onnx"
        await c.models.pull("lin", None, out)
        assert out.read_bytes() == model.read_bytes()

        async def two_workers() -> bool:
            return len(await c.lookup(WORKERS)) == 2

        await wait_for(two_workers)
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        want = reference(model, x)
        name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_outputs()[0].name
        res = await c.infer_detailed("lin", {"x": x})
        np.testing.assert_allclose(res.outputs[name], want, rtol=1e-5)
        assert res.worker in {w.identity.public_hex for w in swarm["workers"]}

        with pytest.raises(swarmd_rpc.BadRequest) as bad:
            await c.infer("lin", {"x": np.zeros((3, 5), np.float32)})
        assert isinstance(bad.value, SwarmdError) and bad.value.code == "ERR_BAD_REQUEST"
        with pytest.raises(swarmd_rpc.NotFound):
            await c.models.get("no-such-model")
        with pytest.raises(swarmd_rpc.UnknownMethod):
            await c.call(swarm["workers"][0].identity.public_key, "noSuchMethod")
        health = await c.call(swarm["workers"][0].identity.public_hex, "getHealth")
        assert health["state"] == "ONLINE"

        # the worker that answered goes away: the next calls land on the other one
        keys = [w.identity.public_hex for w in swarm["workers"]]
        gone = keys.index(res.worker)
        await swarm["nodes"][1 + gone].stop()
        for _ in range(3):
            again = await c.infer_detailed("lin", {"x": x})
            assert again.worker == keys[1 - gone]
            np.testing.assert_allclose(again.outputs[name], want, rtol=1e-5)

    # a fresh client: the stopped worker withdrew its record, so only the live one is routed to
    async with Client(bootstrap=swarm["boot"]) as r:
        res = await r.infer_detailed("lin", {"x": x})
        assert res.worker == keys[1 - gone]


async def test_join_and_lookup_between_two_clients(swarm: Any) -> None:
    async with Client(bootstrap=swarm["boot"]) as a, Client(bootstrap=swarm["boot"]) as b:
        await a.join("example/chat", payload={"nick": "a"}, lookup=False)
        recs = await b.lookup("example/chat")
        assert [(r.public_key, r.payload) for r in recs] == [(a.identity.public_key, {"nick": "a"})]
        await a.leave("example/chat")


async def test_router_fails_over_from_an_overloaded_worker() -> None:
    """Two real RPC servers: one refuses with ERR_OVERLOADED, the other answers; the fleet's router
    (the one the client and the gateway use) lands the call on the second."""
    servers = []
    calls: list[str] = []
    for name in ("busy", "ok"):
        m = Methods()

        async def run(ctx: Any, params: Any, name: str = name) -> Any:
            calls.append(name)
            if name == "busy":
                raise SwarmdError(ERR_OVERLOADED, "queue full")
            return {"model": params["model"], "version": "1", "outputs": {"y": params["inputs"]["x"] * 2}}

        m.register("runInference", run, op="r")
        ident = Identity.generate()
        srv = RpcServer(ident, m)
        await srv.start()
        servers.append((ident, srv))
    config = OrchestratorConfig(policy="round_robin", seed=1)
    fleet = Fleet(config, health_checks=False)
    for ident, srv in servers:
        fleet.balancer.admit(
            WorkerAd(ident.public_hex, ["m"], addresses=[("127.0.0.1", srv.port)]), source="rpc"
        )
    busy, ok = (i.public_hex for i, _ in servers)
    try:
        x = np.arange(3, dtype=np.float32)
        for _ in range(2):  # round robin: one of the two requests goes to the busy worker first
            res, lease = await fleet.route("runInference", {"model": "m", "inputs": {"x": x}}, model="m", budget=10.0)
            assert lease.public_key == ok
            np.testing.assert_array_equal(res["outputs"]["y"], x * 2)
        assert calls.count("busy") == 1 and calls.count("ok") == 2
        fleet.balancer.unregister(ok)
        with pytest.raises(SwarmdError) as e:
            await fleet.route("runInference", {"model": "m", "inputs": {"x": x}}, model="m", budget=10.0)
        assert e.value.code == "ERR_UNAVAILABLE" and ERR_OVERLOADED in e.value.message and busy[:16] in e.value.message
    finally:
        await fleet.stop()
        for _, s in servers:
            await s.stop()


def test_sync_client_for_one_peer(tmp_path: Path) -> None:
    """SyncClient runs its own loop thread; here it talks to one worker by key and address, no DHT."""
    model = write_model(tmp_path / "m.onnx", seed=5)
    s = settings(tmp_path / "w", ["worker"])
    s.worker.models = [f"lin={model}"]
    loop = asyncio.new_event_loop()
    node = Node(s)
    ctx = loop.run_until_complete(node.start())
    import threading

    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        with SyncClient.for_peer(ctx.identity.public_hex, "127.0.0.1", ctx.ports["rpc"]) as c:
            x = np.ones((2, 4), np.float32)
            out = c.infer("lin", {"x": x})
            np.testing.assert_allclose(next(iter(out.values())), reference(model, x), rtol=1e-5)
            with pytest.raises(swarmd_rpc.Unavailable):
                c.lookup("anything")
            with pytest.raises(swarmd_rpc.NotFound):
                c.call(Identity.generate().public_key, "getHealth")
        with pytest.raises(swarmd_rpc.Closed):
            c.infer("lin", {"x": x})
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


def test_error_classes_keep_the_code_and_base() -> None:
    for code, cls in swarmd_rpc.errors.BY_CODE.items():
        e = swarmd_rpc.translate(SwarmdError(code, "m", {"k": 1}))
        assert type(e) is cls and e.code == code and e.message == "m" and e.data == {"k": 1}
        assert isinstance(e, SwarmdError)
    odd = swarmd_rpc.translate(SwarmdError("ERR_SOMETHING_NEW", "m"))
    assert isinstance(odd, swarmd_rpc.ClientError) and odd.code == "ERR_SOMETHING_NEW"
    assert isinstance(swarmd_rpc.translate(TimeoutError()), swarmd_rpc.Timeout)
    assert isinstance(swarmd_rpc.translate(ConnectionRefusedError()), swarmd_rpc.Unavailable)


def test_every_public_name_has_a_docstring_and_types() -> None:
    import inspect

    for name in swarmd_rpc.__all__:
        obj = getattr(swarmd_rpc, name)
        assert inspect.getdoc(obj), f"swarmd_rpc.{name} has no docstring"
        if not (inspect.isclass(obj) and obj.__module__.startswith("swarmd_rpc.")):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not callable(member) and not isinstance(member, (classmethod, staticmethod)):
                continue
            fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            assert inspect.getdoc(fn), f"swarmd_rpc.{name}.{attr} has no docstring"
            sig = inspect.signature(fn)
            assert sig.return_annotation is not inspect.Signature.empty, f"{name}.{attr} has no return type"


async def test_stores_whose_live_record_missed_refreshes_are_asked_last() -> None:
    """A killed store's record lingers until it expires: the client tries the live ones first."""
    import time
    from types import SimpleNamespace

    now = time.time()

    def signed(i: int, ago: float, ttl: float = 12.0) -> SimpleNamespace:
        return SimpleNamespace(public_key=bytes([i]) * 32, seq=int((now - ago) * 1000), expiry=now - ago + ttl)

    c = Client(bootstrap=["127.0.0.1:9"])

    async def lookup(topic: str, timeout: float | None = None, **kw: Any) -> list[Any]:
        return [signed(1, 10.0), signed(2, 1.0), signed(3, 30.0, ttl=1200.0)]

    c.lookup = lookup  # type: ignore[method-assign]  # the records a lookup would return
    assert await c._store_keys("swarmd/stores") == [bytes([2]) * 32, bytes([3]) * 32, bytes([1]) * 32]
