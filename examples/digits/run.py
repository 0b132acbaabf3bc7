"""The digits classifier, asked two ways: stock tritonclient over HTTP, and swarmd_rpc over the swarm.

    python examples/digits/run.py

1. train scikit-learn's 8x8 digits classifier and export it to ONNX (the
   same model `make run` serves);
2. start a hub (bootstrap + store + orchestrator + gateway on HTTP) and a
   worker with the real CLI on 127.0.0.1, with an API key made by
   `swarmd keys create` before the gateway starts;
3. push the model with `swarmd model push`;
4. classify 200 digits through the gateway with `tritonclient.http`
   (Open Inference Protocol v2, the binary tensor extension), then through
   `swarmd_rpc.SyncClient` straight to a worker, and check both agree;
5. stop every process it started (by PID).
The last line printed is a JSON summary (the test reads it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/swarmlab.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's swarmd and swarmd_rpc

from swarmlab import Lab, wait_until  # noqa: E402

from swarmd.demo import build_digits_model, pick_http  # noqa: E402
from swarmd_rpc import SyncClient, quiet_logs  # noqa: E402

MODEL = "digits"


def main() -> None:
    import tritonclient.http as triton
    from sklearn.datasets import load_digits

    quiet_logs()
    x, y = load_digits(return_X_y=True)
    x_test, y_test = x[-200:].astype(np.float32), y[-200:]
    with Lab() as lab:
        model = lab.dir / "digits.onnx"
        build_digits_model(model)
        hub_dir = str(lab.dir / "hub")
        key = lab.cli("keys", "--data-dir", hub_dir, "create", "--name", "example", "--permissions", "infer")
        key = key.splitlines()[0].strip()
        hub = lab.start("hub", "--role", "bootstrap,store,orchestrator,gateway", "--http", pick_http(0))
        boot = f"127.0.0.1:{hub.ports['dht']}"
        lab.start("worker", "--role", "worker", "--bootstrap", boot)
        print(lab.cli("model", "push", str(model), "--name", MODEL, "--version", "1", "--data-dir", hub_dir).strip())

        # 1) tritonclient against the gateway's OIP v2 HTTP API
        url = f"127.0.0.1:{hub.ports['http']}"
        http = triton.InferenceServerClient(url)
        headers = {"x-api-key": key}

        def ask_gateway() -> np.ndarray:
            inp = triton.InferInput("input", list(x_test.shape), "FP32")
            inp.set_data_from_numpy(x_test, binary_data=True)
            out = triton.InferRequestedOutput("label", binary_data=True)
            return http.infer(MODEL, [inp], outputs=[out], headers=headers).as_numpy("label")

        via_http = wait_until(lambda: [ask_gateway()], what="the gateway to serve the model")[0]
        http.close()
        print(f"tritonclient via the gateway at {url}: accuracy {np.mean(via_http == y_test):.3f}")

        # 2) swarmd_rpc through the swarm: an orchestrator picks the worker, the client calls it
        with SyncClient(bootstrap=[boot]) as swarm:
            res = swarm.infer_detailed(MODEL, {"input": x_test})
        via_rpc = res.outputs["label"]
        print(f"swarmd_rpc via worker {res.worker[:16]}: accuracy {np.mean(via_rpc == y_test):.3f}")
        summary = {"n": len(y_test), "http_accuracy": round(float(np.mean(via_http == y_test)), 4),
                   "rpc_accuracy": round(float(np.mean(via_rpc == y_test)), 4),
                   "agree": bool(np.array_equal(via_http, via_rpc))}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
