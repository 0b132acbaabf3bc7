"""Test peers for the orchestrator tests: small real RPC servers that answer like workers.

`PeerWorker` runs in-process (so a test can make it hang or hold calls);
running this file as a script serves the same methods in a separate process
(so a test can kill it with SIGKILL mid-load). Both compute a real result
(a fixed linear layer in numpy) so a wrong routing shows up as a wrong answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, SwarmdError
from swarmd.node.identity import Identity
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.roles.orchestrator import OrchestratorRole
from swarmd.rpc import CallContext, Methods, RpcPeer, RpcServer, connect
from swarmd.rpc.config import AccessConfig
from swarmd.rpc.part import firewall_from
from swarmd.settings import Settings
from tests.conftest import node_context

T = 20.0  # generous per-call timeout: the machine is shared
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0


def expected(x: np.ndarray) -> np.ndarray:
    return x @ WEIGHTS


class PeerWorker:
    def __init__(self, models: tuple[str, ...] = ("mlp",)) -> None:
        self.identity = Identity.generate()
        self.models = models
        self.methods = Methods()
        self.methods.register("runInference", self.run_inference)
        self.methods.register("checkCapacity", self.check_capacity)
        self.server = RpcServer(self.identity, self.methods)
        self.hung = False  # accept calls, never answer any
        self.gate: asyncio.Event | None = None  # when set to an unset Event, runInference waits on it
        self.state = "ONLINE"
        self.loadable: set[str] = set()  # models it would fetch from a store on first request
        self.served = 0
        self.in_flight = 0
        self._never = asyncio.Event()

    @property
    def public_hex(self) -> str:
        return self.identity.public_hex

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> PeerWorker:
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()

    async def run_inference(self, ctx: CallContext, params: Any) -> Any:
        self.in_flight += 1
        try:
            if self.hung:
                await self._never.wait()
            if self.gate is not None:
                await self.gate.wait()
            return self._answer(params)
        finally:
            self.in_flight -= 1

    def _answer(self, params: Any) -> Any:
        if params.get("model") in self.loadable:
            self.models = (*self.models, params["model"])
            self.loadable.discard(params["model"])
        if params.get("model") not in self.models:
            raise SwarmdError(ERR_NOT_FOUND, f"model {params.get('model')!r} is not loaded here")
        x = params["inputs"].get("x")
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape[-1] != 4:
            raise SwarmdError(ERR_BAD_REQUEST, "input 'x' must be float32 [n, 4]")
        self.served += 1
        return {"model": params["model"], "version": "1", "outputs": {"y": expected(x)}}

    async def check_capacity(self, ctx: CallContext, params: Any) -> Any:
        if self.hung:
            await self._never.wait()
        return {
            "state": self.state,
            "queue_depth": 0,
            "in_flight": self.in_flight,
            "max_concurrent": 64,
            "accepting": self.state == "ONLINE",
        }


class Orchestrator:
    """An orchestrator role plugged into a real RPC server (the swarm's, if given), plus a client connected to it."""

    def __init__(
        self, tmp: Path, swarm: Any = None, trust: Any = None, identity: Identity | None = None, **cfg: Any
    ) -> None:
        """trust (swarmd.node.trust.Trust): the node's trust; without a swarm, its RPC
        server then has the daemon's firewall (role-checked methods), as RpcPart builds it."""
        settings = Settings()
        settings.trust.open = True  # an open swarm, asked for
        settings.orchestrator = OrchestratorConfig(**cfg)
        self.identity = swarm.identity if swarm is not None else identity or Identity.generate()
        self.ctx = node_context(tmp, "orchestrator", settings=settings, identity=self.identity,
                                methods=swarm.methods if swarm is not None else Methods(), swarm=swarm)
        self.role = OrchestratorRole(self.ctx)
        self.ctx.trust = trust
        firewall = None if trust is None else firewall_from(AccessConfig(), self.identity.public_key, trust)
        self.server = (
            swarm.server if swarm is not None else RpcServer(self.identity, self.ctx.methods, firewall=firewall)
        )
        self.client: RpcPeer | None = None

    async def start(self) -> Orchestrator:
        if self.ctx.swarm is None:
            await self.server.start()
        await self.role.start()
        # the operator's tool on the orchestrator's box: its own key, which may
        # register workers by hand (any other key may only register itself)
        self.client = await connect(
            self.identity, "127.0.0.1", self.server.port, remote_public_key=self.identity.public_key
        )
        return self

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.role.stop()
        if self.ctx.swarm is None:
            await self.server.stop()
        await self.ctx.tasks.close()

    async def call(self, method: str, params: Any = None) -> Any:
        assert self.client is not None
        return await self.client.call(method, params, timeout=T)

    async def register(self, w: PeerWorker | WorkerProcess, **extra: Any) -> Any:
        return await self.call(
            "registerWorker",
            {"public_key": w.public_hex, "models": ["mlp"], "host": "127.0.0.1", "port": w.port, **extra},
        )

    async def infer(self, i: int = 0) -> dict[str, Any]:
        x = np.full((1, 4), float(i), dtype=np.float32)
        out = await self.call(
            "routeInferenceRequest", {"model": "mlp", "inputs": {"x": x}, "request_id": str(i)}
        )
        np.testing.assert_allclose(out["outputs"]["y"], expected(x))
        return out


class WorkerProcess:
    """This file run as a child process; stdout's first line says who and where it is."""

    def __init__(self, proc: subprocess.Popen[str], public_hex: str, port: int) -> None:
        self.proc = proc
        self.public_hex = public_hex
        self.port = port

    @classmethod
    def spawn(cls, models: tuple[str, ...] = ("mlp",)) -> WorkerProcess:
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *models],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise RuntimeError("worker process exited before it was ready")
        info = json.loads(line)
        return cls(proc, info["public_key"], info["port"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def _serve(models: tuple[str, ...]) -> None:
    w = await PeerWorker(models).start()
    print(json.dumps({"public_key": w.public_hex, "port": w.port}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    from loguru import logger

    logger.remove()
    asyncio.run(_serve(tuple(sys.argv[1:]) or ("mlp",)))
