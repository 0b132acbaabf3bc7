"""Order a day's deliveries by travel times a swarm predicts.

    python examples/logistics/run.py

The seed project's logistics scenario, end to end on this machine:
1. generate a year of trips in a small city (a river with two bridges, rush
   hours) and train a travel-time regression with scikit-learn;
2. export it to ONNX (skl2onnx);
3. start a swarm with the real CLI: a hub (bootstrap + store + orchestrator)
   and a worker, on 127.0.0.1;
4. push the model to the store with the client library, and have the worker
   serve it (it fetches the model from the store on its first request);
5. plan the day: from the depot, repeatedly drive to the stop with the
   shortest predicted travel time (greedy nearest neighbour; one batched
   inference per leg), and compare with the order the stops came in;
6. stop every process it started (by PID).
The last line printed is a JSON summary (the test reads it).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/swarmlab.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's swarmd_rpc

from swarmlab import Lab, wait_until  # noqa: E402

from swarmd_rpc import SyncClient, quiet_logs  # noqa: E402

MODEL = "travel-time"
DEPOT = (10.0, 10.0)
RIVER_X = 12.0
BRIDGES_Y = (5.0, 15.0)


def true_minutes(a: np.ndarray, b: np.ndarray, hour: np.ndarray) -> np.ndarray:
    """The city's (hidden) travel time: Manhattan distance at the hour's speed, a detour to the
    nearest bridge when the trip crosses the river, two minutes to park."""
    ax, ay, bx, by = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    crosses = (ax < RIVER_X) != (bx < RIVER_X)
    detour = np.min([np.abs(ay - y) + np.abs(by - y) - np.abs(ay - by) for y in BRIDGES_Y], axis=0)
    km = np.abs(ax - bx) + np.abs(ay - by) + np.where(crosses, detour, 0.0)
    rush = ((hour >= 7) & (hour < 9.5)) | ((hour >= 16) & (hour < 18.5))
    speed = np.where(rush, 18.0, 35.0)  # km/h
    return km / speed * 60.0 + 2.0


def training_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.uniform(0, 20, (n, 2))
    b = rng.uniform(0, 20, (n, 2))
    hour = rng.uniform(6, 20, n)
    y = true_minutes(a, b, hour) + rng.normal(0, 1.0, n)  # traffic noise
    return np.column_stack([a, b, hour]).astype(np.float32), y.astype(np.float32)


def train(path: Path) -> float:
    """Fit the regression, export it to ONNX at path; returns its mean absolute error on fresh trips."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor

    rng = np.random.default_rng(7)
    x, y = training_data(6000, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = GradientBoostingRegressor(n_estimators=200, max_depth=5, learning_rate=0.1, random_state=0).fit(x, y)
        onx = to_onnx(reg, x[:1], target_opset=17)  # input "X": float32[None, 5], output "variable"
    path.write_bytes(onx.SerializeToString())
    xt, yt = training_data(2000, rng)
    return float(np.mean(np.abs(reg.predict(xt) - yt)))


def plan_greedy(swarm: SyncClient, stops: np.ndarray, start_hour: float) -> tuple[list[int], float]:
    """Nearest neighbour on predicted minutes; returns the order and the predicted total."""
    here, hour, left, order, total = np.array(DEPOT), start_hour, list(range(len(stops))), [], 0.0
    while left:
        feats = np.column_stack([np.tile(here, (len(left), 1)), stops[left], np.full(len(left), hour)])
        minutes = swarm.infer(MODEL, {"X": feats.astype(np.float32)})["variable"][:, 0]
        k = int(np.argmin(minutes))
        order.append(left.pop(k))
        total += float(minutes[k])
        hour += float(minutes[k]) / 60.0
        here = stops[order[-1]]
    return order, total


def drive(stops: np.ndarray, order: list[int], start_hour: float) -> float:
    """Minutes the route really takes (the hidden function, no noise), depot to last stop."""
    here, hour, total = np.array([DEPOT]), start_hour, 0.0
    for i in order:
        m = float(true_minutes(here, stops[i : i + 1], np.array([hour]))[0])
        total += m
        hour += m / 60.0
        here = stops[i : i + 1]
    return total


def main() -> None:
    quiet_logs()
    with Lab() as lab:
        model = lab.dir / "travel-time.onnx"
        mae = train(model)
        print(f"trained {MODEL}: mean absolute error {mae:.2f} min on unseen trips")
        hub = lab.start("hub", "--role", "bootstrap,store,orchestrator")
        boot = f"127.0.0.1:{hub.ports['dht']}"
        lab.start("worker", "--role", "worker", "--bootstrap", boot)

        with SyncClient(bootstrap=[boot]) as swarm:
            meta = swarm.models.push(model, MODEL, "1", tags=["logistics"],
                                     progress=lambda done, total: None)
            print(f"pushed {meta['name']}:{meta['version']} ({meta['size']} bytes, sha256 {meta['digest'][:12]})")
            probe = {"X": np.array([[*DEPOT, 15.0, 10.0, 12.0]], np.float32)}
            wait_until(lambda: swarm.infer(MODEL, probe, timeout=10), what="the worker to serve the model")

            rng = np.random.default_rng(2024)
            stops = rng.uniform(0, 20, (12, 2))
            start = 8.0
            order, predicted = plan_greedy(swarm, stops, start)
            given = list(range(len(stops)))
            greedy_real, given_real = drive(stops, order, start), drive(stops, given, start)

        print(f"\n{'leg':>3}  {'stop':>4}  {'x km':>5}  {'y km':>5}")
        for leg, i in enumerate(order, 1):
            print(f"{leg:>3}  {i:>4}  {stops[i][0]:5.1f}  {stops[i][1]:5.1f}")
        print(f"\ngreedy on predicted times: {greedy_real:6.1f} min driven (predicted {predicted:.1f})")
        print(f"stops in the order given:  {given_real:6.1f} min driven")
        summary = {"stops": len(order), "order": order, "model_mae_min": round(mae, 3),
                   "predicted_min": round(predicted, 2), "greedy_min": round(greedy_real, 2),
                   "given_order_min": round(given_real, 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
