"""Helpers for the gateway tests: small real ONNX models and a real gateway on a thread.

The gateway runs on its own event loop in a thread so that synchronous
clients (the stock tritonclient, http.client, raw sockets) can talk to it
from the test body exactly as they would to a remote server.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from swarmd.gateway.config import GatewayConfig
from swarmd.gateway.keys import KeyStore
from swarmd.gateway.local import LocalBackend
from swarmd.gateway.server import Gateway


def tiny_mlp(seed: int = 0, n_in: int = 4, hidden: int = 8, n_out: int = 3) -> bytes:
    """x[-1, n_in] float32 -> y[-1, n_out] float32 (scores) and label[-1] int64 (argmax)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((n_in, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, n_out)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(model_bytes: bytes, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def install_model(models_dir: Path, name: str, version: str, data: bytes) -> None:
    vdir = models_dir / name / version
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "model.onnx").write_bytes(data)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class GatewayThread:
    """A real Gateway + LocalBackend + KeyStore on 127.0.0.1, port 0, in a thread."""

    data_dir: Path
    config: GatewayConfig = field(default_factory=GatewayConfig)
    admin_key: str = ""
    gateway: Gateway | None = None
    port: int = 0

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.keys = KeyStore(self.data_dir / "gateway" / "keys.sqlite")
        _, self.admin_key = self.keys.create("admin", ["admin"])
        self.backend = LocalBackend(self.data_dir / "models")
        self.call(self._start())

    async def _start(self) -> None:
        await self.backend.start()
        self.gateway = Gateway(self.config, self.backend, self.keys, data_dir=self.data_dir)
        self.port = await self.gateway.start("127.0.0.1", 0)

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def key(self, *permissions: str, **limits: float) -> str:
        _, token = self.keys.create("test", list(permissions), **limits)
        return token

    def until(self, what: Callable[[], Any], timeout: float = 30.0) -> None:
        """Poll `what` on the gateway's loop (its state is read there) until it is true, bounded."""
        async def read() -> Any:
            return what()

        end = time.monotonic() + timeout
        while not self.call(read()):
            assert time.monotonic() < end, "the gateway never got there"
            time.sleep(0.01)

    @contextlib.contextmanager
    def access_entries(self) -> Iterator[list[dict[str, Any]]]:
        """The access-log entries (both fronts) written while the block runs; what earlier requests
        left waiting is written first, what the block's requests left is written when it ends."""
        from loguru import logger

        async def flush() -> None:
            assert self.gateway is not None and self.gateway.access_log is not None
            self.gateway.access_log.flush()

        logger.enable("swarmd")  # conftest's enable may have run before swarmd/__init__ disabled it
        assert self.gateway is not None and self.gateway.access_log is not None
        access_log, mark = self.gateway.access_log, f"access-entries-{id(self)}"  # this gateway's lines only
        entries: list[dict[str, Any]] = []
        self.call(flush())
        plain, access_log.log = access_log.log, access_log.log.bind(test_mark=mark)
        sink = logger.add(lambda m: entries.extend(m.record["extra"]["requests"]), level="INFO",
                          filter=lambda r: r["extra"].get("test_mark") == mark)
        try:
            yield entries
            self.call(flush())
        finally:
            logger.remove(sink)
            access_log.log = plain

    @contextlib.contextmanager
    def held_runs(self, model: str) -> Iterator[tuple[list[Any], threading.Event]]:
        """Every run of `model` waits until the Event is set (at the latest when the block ends);
        the list holds the runs started so far."""
        runtime = self.backend._get(model, None).runtime
        real_run, blocker, runs = runtime.run, threading.Event(), []

        def held_run(*args: Any) -> Any:
            runs.append(args)
            blocker.wait(30)
            return real_run(*args)

        runtime.run = held_run
        try:
            yield runs, blocker
        finally:
            blocker.set()
            runtime.run = real_run

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["x-api-key"] = key
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        out = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        conn.close()
        return out

    def raw(self, data: bytes) -> bytes:
        """Send raw bytes, return everything the server answers before it closes (or goes quiet for 10 s)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            chunks = []
            while True:
                try:
                    c = s.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    break
                if not c:
                    break
                chunks.append(c)
            return b"".join(chunks)

    def close(self) -> None:
        async def _stop() -> None:
            if self.gateway is not None:
                await self.gateway.stop()
            await self.backend.stop()

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.keys.close()
