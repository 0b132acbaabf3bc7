"""[worker]: how a worker runs models, batches requests and bounds its load.

Batching settings have worker-wide defaults and per-model overrides, because
the best batch size and delay depend on the model: a large MLP gains from
batching, a model whose rows are not independent must never be batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swarmd.errors import ConfigError

BATCHING_KEYS = ("batching", "max_batch_size", "max_queue_delay_us")


@dataclass(frozen=True)
class BatchingConfig:
    """The batching policy of one model, resolved from defaults and overrides."""

    enabled: bool = True
    max_batch_size: int = 32  # rows per run; a single larger request still runs alone
    max_queue_delay_us: int = 0  # how long the first queued request may wait for company


@dataclass
class WorkerConfig:
    """[worker]: how a worker runs models, batches requests and bounds its load."""

    # Local ONNX files served with no store: "name=path" or "name:version=path".
    models: list[str] = field(default_factory=list)
    # onnxruntime execution providers to try, best first (e.g. ["CUDAExecutionProvider"]); empty = the
    # best the installed onnxruntime offers. CPUExecutionProvider is always added last, and a model
    # that fails to load on the others is loaded on the CPU with a logged reason (swarmd[gpu] brings
    # onnxruntime-gpu).
    providers: list[str] = field(default_factory=list)
    # onnxruntime threads per session; 0 lets onnxruntime choose (all cores).
    intra_op_threads: int = 1
    inter_op_threads: int = 1  # onnxruntime threads across independent graph nodes; 0: onnxruntime chooses
    # Runs executing at once across all models (each in its own executor thread).
    max_concurrent_inferences: int = 2
    # A lone batch-1 request on an idle worker runs on the event loop thread, skipping the
    # executor handoff, when the model's runs take at most this long (µs); 0 = always a thread.
    # The handoff (submit, thread wake-up, call_soon_threadsafe and the loop's self-pipe wake-up)
    # costs ~100-200 µs here; below ~2 ms of run that is >= 10 % of the request, and blocking
    # the loop for at most 2 ms when the worker has nothing else running costs a request that
    # arrives meanwhile at most that wait (it then batches). Under load (anything in flight,
    # or batches forming) runs stay in threads whatever this is.
    inline_run_us: int = 2000
    # Requests accepted but not yet running; one more is refused with ERR_OVERLOADED.
    max_queue: int = 256
    # Worker-wide batching defaults.
    batching: bool = True
    max_batch_size: int = 32  # rows per batched run (per model: model_batching)
    max_queue_delay_us: int = 0  # how long a first queued request waits for company (µs)
    # Per-model overrides: {"mlp": {"max_batch_size": 64, "max_queue_delay_us": 200, "batching": true}}
    model_batching: dict[str, Any] = field(default_factory=dict)
    # Default deadline (s) for a request that arrives without one.
    default_timeout: float = 30.0
    # On-disk cache of model blobs under <data_dir>/worker/cache, least recently used evicted first.
    cache_bytes: int = 4 * 1024**3
    # Largest model blob the worker will download.
    max_model_bytes: int = 2 * 1024**3
    # Seconds between refreshes of the worker's DHT announcements (state and live load).
    announce_interval: float = 5.0
    # Bounds on talking to stores: one RPC, and a whole model download.
    store_timeout: float = 10.0
    fetch_timeout: float = 300.0  # bound on a whole model download, in seconds
    # Models loaded at once (each holds a session in memory). Models loaded by inference requests
    # are a cache: the least recently used one is unloaded to make room. Models pinned by the
    # operator (loadModel, preload, worker.models) are never evicted; past max_models of those,
    # loading one more is refused.
    max_models: int = 16
    # Seconds between checks of the stores' catalogs for the names this worker serves: an
    # unversioned request is served by the newest live version (swarmd.versions) at most this
    # old, and versions deleted from the stores are unloaded within it.
    catalog_interval: float = 2.0
    # Model loads (fetch + session build) in progress at once, e.g. triggered by first requests.
    max_concurrent_loads: int = 4
    # Models to fetch from the stores and load at start: "name" or "name:version".
    preload: list[str] = field(default_factory=list)
    # How long a draining worker waits for accepted requests before giving up.
    drain_timeout: float = 10.0

    def batching_for(self, model: str) -> BatchingConfig:
        """The batching policy for `model`: worker defaults overlaid with its overrides."""
        values: dict[str, Any] = {
            "enabled": self.batching,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
        }
        override = self.model_batching.get(model)
        if override is not None:
            if not isinstance(override, dict):
                raise ConfigError(f"worker.model_batching.{model} must be a table, got {type(override).__name__}")
            for key, value in override.items():
                if key not in BATCHING_KEYS:
                    raise ConfigError(
                        f"unknown key worker.model_batching.{model}.{key}; known: {', '.join(BATCHING_KEYS)}"
                    )
                values["enabled" if key == "batching" else key] = value
        if not isinstance(values["enabled"], bool):
            raise ConfigError(f"worker batching for {model!r} must be true or false")
        for key in ("max_batch_size", "max_queue_delay_us"):
            v = values[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "max_batch_size" else 0):
                raise ConfigError(f"worker {key} for {model!r} must be an integer >= "
                                  f"{1 if key == 'max_batch_size' else 0}, got {v!r}")
        return BatchingConfig(values["enabled"], values["max_batch_size"], values["max_queue_delay_us"])

    def validate(self) -> None:
        """Fail start-up on settings that cannot work, naming the key."""
        refuse_if = ConfigError.refuse_if
        refuse_if(self, "worker", "max_concurrent_inferences max_queue max_models max_concurrent_loads",
                  lambda v: v < 1, "be at least 1")
        refuse_if(self, "worker", "intra_op_threads inter_op_threads inline_run_us", lambda v: v < 0, "be 0 or more")
        refuse_if(self, "worker", "default_timeout announce_interval store_timeout fetch_timeout drain_timeout "
                  "catalog_interval", lambda v: v <= 0, "be positive")
        if not isinstance(self.providers, list) or not all(
                isinstance(p, str) and p.endswith("ExecutionProvider") for p in self.providers):
            raise ConfigError(f"worker.providers must be a list of onnxruntime provider names such as "
                              f"'CUDAExecutionProvider', got {self.providers!r}")
        self.batching_for("")
        for name in self.model_batching:
            self.batching_for(name)
        for spec in self.models:
            parse_local_model(spec)


def parse_local_model(spec: str) -> tuple[str, str, str]:
    """'name=path' or 'name:version=path' -> (name, version, path); version defaults to "1"."""
    left, sep, path = spec.partition("=")
    name, _, version = left.partition(":")
    name, version, path = name.strip(), (version.strip() or "1"), path.strip()
    if not sep or not name or not path:
        raise ConfigError(f"worker.models entry {spec!r} must look like NAME=PATH or NAME:VERSION=PATH")
    return name, version, path
