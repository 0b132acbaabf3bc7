"""The model most newcomers make: skl2onnx's default export of a classifier adds a ZipMap
output (a sequence of maps). Pushed with the CLI (which warns and names the option that
gives a plain tensor), it is served by real daemons on both HTTP routes: JSON objects on
/api/v1, BYTES holding JSON text on /v2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import http_json, run_cli, swarmd_env
from tests.swarm_daemons import start_gateway, start_hub


def _post(port: int, key: str, path: str, doc: dict[str, Any]) -> tuple[int, Any]:
    return http_json(port, key, "POST", path, doc)


def test_runtime_turns_maps_into_json_texts() -> None:
    from swarmd.worker.runtime import json_texts

    out = json_texts([{0: np.float32(0.25), 1: np.float32(0.75)}, {0: 1.0, 1: 0.0}])
    assert out.dtype.kind == "U" and out.shape == (2,)
    assert [json.loads(x) for x in out] == [{"0": 0.25, "1": 0.75}, {"0": 1.0, "1": 0.0}]
    assert [json.loads(x) for x in json_texts({"a": [1, 2]})] == [{"a": [1, 2]}]


def _zipmap_classifier(path: Path) -> tuple[Any, np.ndarray]:
    """skl2onnx's default export of a classifier (with a ZipMap) at `path`; (the classifier, X)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    clf = LogisticRegression().fit(X, y)
    path.write_bytes(to_onnx(clf, X[:1]).SerializeToString())  # the default: with a ZipMap
    return clf, X


async def test_standalone_gateway_runs_models_as_a_worker_does(tmp_path: Path) -> None:
    """The standalone gateway loads with the worker's ModelRuntime: a ZipMap output comes back
    as JSON texts there too, not as a list of dicts no tensor encoder can send."""
    from swarmd.gateway.local import LocalBackend

    (tmp_path / "clf" / "1").mkdir(parents=True)
    clf, X = _zipmap_classifier(tmp_path / "clf" / "1" / "model.onnx")
    backend = LocalBackend(tmp_path)
    await backend.start()
    try:
        res = await backend.infer("clf", None, {"X": X[:3]})
    finally:
        await backend.stop()
    probs = res.outputs["output_probability"]
    assert isinstance(probs, np.ndarray) and probs.dtype.kind == "U" and probs.shape == (3,)
    np.testing.assert_allclose([[json.loads(t)["0"], json.loads(t)["1"]] for t in probs], clf.predict_proba(X[:3]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_zipmap_classifier_is_served_on_both_routes(tmp_path: Path, daemons: Any) -> None:
    model = tmp_path / "clf.onnx"
    clf, X = _zipmap_classifier(model)

    env = swarmd_env(SWARMD_GATEWAY_ACCESS_LOG="false")
    _, boot = start_hub(daemons, tmp_path / "n", "bootstrap,store,worker", env=env)
    _, port, key = start_gateway(daemons, tmp_path / "g", boot, env=env)

    res = run_cli("model", "push", str(model), "--name", "clf", "--data-dir", str(tmp_path / "n"))
    assert res.returncode == 0, res.stderr
    assert "output_probability" in res.stderr and "{'zipmap': False}" in res.stderr  # the warning names the fix

    x = X[:3]
    want = clf.predict_proba(x)
    import time

    deadline = time.monotonic() + 90
    while True:  # the gateway finds the worker on its own schedule
        status, doc = _post(port, key, "/api/v1/inference/clf", {"inputs": {"X": x.tolist()}})
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert status == 200, doc
    probs = doc["outputs"]["output_probability"]
    assert isinstance(probs, list) and len(probs) == 3 and all(isinstance(p, dict) for p in probs)
    np.testing.assert_allclose([[p["0"], p["1"]] for p in probs], want, rtol=1e-5, atol=1e-6)
    assert doc["outputs"]["output_label"] == clf.predict(x).tolist()

    status, doc = _post(port, key, "/v2/models/clf/infer", {"inputs": [
        {"name": "X", "shape": [3, 4], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert status == 200, doc
    out = next(o for o in doc["outputs"] if o["name"] == "output_probability")
    assert out["datatype"] == "BYTES" and out["shape"] == [3]
    np.testing.assert_allclose([[json.loads(t)["0"], json.loads(t)["1"]] for t in out["data"]], want,
                               rtol=1e-5, atol=1e-6)
