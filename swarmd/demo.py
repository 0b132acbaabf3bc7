"""`make run`: one process with every role on loopback, serving a real model.

Builds the demo model locally (scikit-learn's bundled 8x8 digits, a logistic
regression converted with skl2onnx, cached under the data dir), starts a node
with every role (bootstrap, relay, store, worker, orchestrator, gateway; the node
is the first of a new private swarm, open: every key is admitted to every
role unless SWARMD_TRUST_* says otherwise), pushes the model to the store through
the gateway's own upload route, waits until a worker answers, and prints the
URL, the admin key and copy-paste examples that return real predictions.
When the swarm roles are absent it still works: the gateway serves the model
with onnxruntime in-process (the standalone mode). Ctrl-C stops it cleanly.

The admin key is kept in <data dir>/demo/admin.key (mode 0600) so later runs
can print it again; the gateway itself stores only its hash.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from loguru import logger

from swarmd.daemon import Node
from swarmd.errors import SwarmdError
from swarmd.node.config import load_settings
from swarmd.node.logging import setup_logging
from swarmd.node.statusfile import dial_host
from swarmd.roles.base import ROLE_ORDER, NodeContext
from swarmd.settings import Settings

MODEL = "digits"
DEMO_VERSION = "1"
SWARM_ROLES = ("store", "worker", "orchestrator")
SAMPLE = 0  # index into the digits data set of the example shown (a zero)


def build_digits_model(path: Path) -> None:
    """Train a small digits classifier and save it as ONNX (input "input": float32[-1, 64])."""
    import warnings

    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # scaled pixels converge in ~30 iterations instead of thousands (seconds instead of ~20 s
        # on a busy 2-core box); the scaler is part of the ONNX graph, so inputs stay raw 0..16
        clf = LogisticRegression(max_iter=1000)
        pipe = make_pipeline(StandardScaler(), clf).fit(x.astype("float32"), y)
        onx = to_onnx(pipe, initial_types=[("input", FloatTensorType([None, 64]))],
                      options={id(clf): {"zipmap": False}}, target_opset=17)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(onx.SerializeToString())
    os.replace(tmp, path)


def digits_sample(i: int = SAMPLE) -> tuple[list[int], int]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return [int(v) for v in x[i]], int(y[i])  # the data set holds small integers


def role_exists(name: str) -> bool:
    return importlib.util.find_spec(f"swarmd.roles.{name}") is not None


def swarm_exists() -> bool:
    return importlib.util.find_spec("swarmd.swarm.swarm") is not None and all(role_exists(r) for r in SWARM_ROLES)


def pick_http(preferred: int) -> str:
    """127.0.0.1:preferred if it is free, else any free port (0: any free port)."""
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return f"127.0.0.1:{preferred}"
            except OSError:
                pass
    return "127.0.0.1:0"  # the gateway binds a free port itself; the banner shows the one it got


class DemoNode(Node):
    """A Node that, once started, installs the demo model and prints how to use it."""

    def __init__(self, settings: Settings, model_path: Path, swarm: bool) -> None:
        super().__init__(settings)
        self.model_path = model_path
        self.swarm = swarm

    async def start(self) -> NodeContext:
        ctx = await super().start()
        try:
            await self.install(ctx)
        except BaseException:
            await self.stop()
            raise
        return ctx

    def admin_key(self, ctx: NodeContext) -> str:
        role: Any = ctx.role("gateway")
        path = ctx.data_dir / "demo" / "admin.key"
        if role.first_admin_key:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(role.first_admin_key + "\n")
            return role.first_admin_key
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
        if token and role.keys.authenticate(token) is not None:
            return token
        _, token = role.keys.create("demo-admin", ["admin"])  # the saved key is gone or revoked
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token

    async def install(self, ctx: NodeContext) -> None:
        import aiohttp

        role: Any = ctx.role("gateway")
        url = role.gateway.url
        key = self.admin_key(ctx)
        headers = {"x-api-key": key}
        x, label = digits_sample()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            if self.swarm:
                async with http.get(f"{url}/api/v1/models/{MODEL}") as r:
                    have = r.status == 200
                if not have:
                    data = await asyncio.to_thread(self.model_path.read_bytes)
                    async with http.post(f"{url}/api/v1/models", params={"name": MODEL, "version": DEMO_VERSION},
                                         data=data, headers={"Content-Type": "application/octet-stream"}) as r:
                        if r.status != 201:
                            raise SwarmdError("ERR_UNAVAILABLE", f"pushing the demo model failed: {await r.text()}")
                with_worker = ctx.role("worker") is not None and ctx.swarm is not None
                if with_worker:
                    try:
                        await ctx.swarm.request(ctx.identity.public_key, "loadModel", {"model": MODEL}, timeout=60)
                    except SwarmdError as e:
                        logger.bind(event="demo_load_failed").warning("loadModel: {}", e.message)
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]}
            deadline = time.monotonic() + 90
            answer: Any = None
            while True:
                async with http.post(f"{url}/v2/models/{MODEL}/infer", json=body) as r:
                    if r.status == 200:
                        answer = await r.json()
                        break
                    last = await r.text()
                if time.monotonic() > deadline:
                    raise SwarmdError("ERR_UNAVAILABLE", f"the demo model never answered: {last}")
                await asyncio.sleep(0.5)
        got = next(o["data"][0] for o in answer["outputs"] if o["name"] == "label")
        print_banner(url, key, x, label, got, self.swarm, ctx)


def print_banner(url: str, key: str, x: list[int], label: int, got: int, swarm: bool, ctx: NodeContext) -> None:
    data = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]},
                      separators=(",", ":"))
    mode = "swarm: " + ", ".join(ctx.roles) if swarm else "standalone gateway (onnxruntime in-process)"
    python = sys.executable  # the interpreter with swarmd and the examples' packages (the venv's)
    bin_dir = Path(python).parent
    dht = ctx.ports.get("dht")
    boot = f"{dial_host(ctx.settings.node.host)}:{dht}" if swarm and isinstance(dht, int) else None
    swarm_lines = f"""
In another shell (the DHT port changes each run; copy these lines again after a restart):

  . {bin_dir}/activate                 # or call {bin_dir}/swarmd and {python} directly
  export SWARMD_BOOTSTRAP={boot}
  swarmd status --data-dir {ctx.data_dir}
  swarmd model ls
""" if boot else ""
    print(f"""
==============================================================================
 swarmd is running ({mode})
 gateway:   {url}        docs: {url}/docs
 admin key: {key}
 model:     {MODEL} (8x8 handwritten digits; sample #{SAMPLE} is a {label}, the swarm says {got})
 bootstrap: {boot or '- (standalone: no swarm)'}
 data dir:  {ctx.data_dir}
 python:    {python}
==============================================================================
{swarm_lines}
curl (Open Inference Protocol v2):

  curl -s -H 'x-api-key: {key}' {url}/v2/models/{MODEL}/infer \\
    -d '{data}'

Python (tritonclient, or any HTTP client; run it with {python}):

  import numpy as np, tritonclient.http as t
  from sklearn.datasets import load_digits
  X, y = load_digits(return_X_y=True)
  c = t.InferenceServerClient("{url.removeprefix('http://')}")
  i = t.InferInput("input", [10, 64], "FP32"); i.set_data_from_numpy(X[:10].astype(np.float32))
  r = c.infer("{MODEL}", [i], headers={{"x-api-key": "{key}"}})
  print(r.as_numpy("label"), "expected", y[:10])

Press Ctrl-C to stop.
""", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swarmd.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(".run/data"))
    ap.add_argument("--port", type=int, default=8080, help="gateway HTTP port (a free one if taken)")
    ap.add_argument("--standalone", action="store_true", help="gateway only, onnxruntime in-process")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    setup_logging(args.log_level, "text")
    data_dir = args.data_dir.resolve()
    demo_dir = data_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    swarm = swarm_exists() and not args.standalone
    model_path = demo_dir / f"{MODEL}-v{DEMO_VERSION}.onnx"
    if not model_path.exists():
        print(f"building the demo model ({MODEL}, scikit-learn + skl2onnx) ...", flush=True)
        build_digits_model(model_path)
    node: dict[str, Any] = {"data_dir": str(data_dir), "http": pick_http(args.port), "log_level": args.log_level.upper()}
    gateway: dict[str, Any] = {"print_admin_key": False}
    if swarm:
        node["roles"] = [r for r in ROLE_ORDER if role_exists(r)]  # every role: bootstrap, relay too
    else:
        node["roles"] = ["gateway"]
        models = demo_dir / "models"
        vdir = models / MODEL / DEMO_VERSION
        vdir.mkdir(parents=True, exist_ok=True)
        if not (vdir / "model.onnx").exists():
            (vdir / "model.onnx").write_bytes(model_path.read_bytes())
        gateway["local_models_dir"] = str(models)
    environ = {k: v for k, v in os.environ.items() if k.startswith("SWARMD_")}
    flags: dict[str, dict[str, Any]] = {"node": node, "gateway": gateway}
    if not any(k.startswith("SWARMD_TRUST_") for k in environ):
        # a loopback demo asks for an open swarm (every key admitted to every role);
        # SWARMD_TRUST_OPERATORS/GRANTS run it under a trust model instead
        flags["trust"] = {"open": True}
    try:
        settings = load_settings(Settings, environ=environ, flags=flags)
    except SwarmdError as e:
        print(f"swarmd demo: {e.message}", file=sys.stderr)
        return 2
    try:
        from swarmd.node.eventloop import exit_process, run

        exit_process(run(DemoNode(settings, model_path, swarm).run(), settings.node.event_loop, reap_timeout=2.0))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
