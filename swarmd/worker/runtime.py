"""One loaded ONNX model: an onnxruntime session and the signature read from it.

onnxruntime is imported here, lazily, on the first load: a node that is not a
worker never pays its import time and memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from swarmd.errors import ERR_INVALID_MODEL, SwarmdError
from swarmd.signature import ModelSignature, TensorSpec


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


CPU = "CPUExecutionProvider"
# Compute providers best first; CPU is always the last resort. A provider an onnxruntime
# build lists but that computes nothing here (AzureExecutionProvider calls a remote
# endpoint) is never chosen on its own.
PREFERRED: tuple[str, ...] = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
    "DmlExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider", "QNNExecutionProvider",
    CPU,
)


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """(providers to ask onnxruntime for, best first and CPU last; a sentence for each wanted
    provider left out). `wanted` empty means the best the installed onnxruntime offers."""
    notes: list[str] = []
    if wanted:
        chosen = []
        for p in wanted:
            if p in available:
                if p not in chosen:
                    chosen.append(p)
            else:
                notes.append(f"{p} is not available in this onnxruntime (it has {', '.join(available) or 'none'})")
    else:
        chosen = [p for p in PREFERRED if p in available]
    chosen = [p for p in chosen if p != CPU] + [CPU]
    return chosen, notes


class ModelRuntime:
    """Wraps an InferenceSession; `run` is blocking and meant for an executor thread.

    onnxruntime releases the GIL while it computes and a session may run from
    several threads at once, so one runtime serves concurrent batches.

    `providers`: the execution providers to try (worker.providers; empty = the best
    available, CPU last). A model that fails to load with them is loaded again on the
    CPU alone and `fallback` says why; `provider` names the one that runs it.
    """

    def __init__(self, source: Path | bytes, *, intra_op_threads: int = 1, inter_op_threads: int = 1,
                 providers: Sequence[str] = ()) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.log_severity_level = 3  # errors only: onnxruntime's warnings would bypass our logging
        what = source.name if isinstance(source, Path) else f"{len(source)} bytes"
        chosen, self.notes = choose_providers(providers, ort.get_available_providers())
        self.fallback: str | None = None
        model = str(source) if isinstance(source, Path) else source
        try:
            try:
                self.session = ort.InferenceSession(model, opts, providers=chosen)
            except Exception as e:
                if chosen == [CPU]:
                    raise
                self.fallback = f"{chosen[0]} could not load it ({_first_line(e)}); running on {CPU}"
                self.session = ort.InferenceSession(model, opts, providers=[CPU])
        except Exception as e:  # onnxruntime raises its own exception types for unparseable models
            raise SwarmdError(ERR_INVALID_MODEL, f"onnxruntime cannot load the model ({what}): {_first_line(e)}") from None
        active = self.session.get_providers()
        self.provider: str = next((p for p in active if p in PREFERRED), active[0])  # the one that computes
        self.signature = ModelSignature(
            inputs=tuple(TensorSpec.from_node_arg(a) for a in self.session.get_inputs()),
            outputs=tuple(TensorSpec.from_node_arg(a) for a in self.session.get_outputs()),
        )
        # a model whose outputs are all tensors (most) is answered without a pass over them
        self._tensors_only = all(a.type.startswith("tensor(") for a in self.session.get_outputs())
        # On the CPU alone, the session's compiled run: InferenceSession.run first re-checks the
        # feed names, graph capture and OrtValue ownership in Python (~10-15 µs a run here, a
        # tenth of a batch-1 run of bench/gateway.py's MLP), which the signature's validate()
        # already did for names and the worker never uses the other two. With another provider
        # the public run keeps its fallback to the CPU on an execution provider failure.
        raw = getattr(self.session, "_sess", None)
        self._run = raw.run if active == [CPU] and raw is not None and hasattr(raw, "run") else None

    def run(self, output_names: tuple[str, ...], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Blocking run; the caller validated `feeds` against the signature.

        Outputs that are not tensors (a sequence of maps, as skl2onnx's default ZipMap
        classifier output, or a map) come back as a string tensor of JSON texts, one
        per element (see json_texts), so every output travels as a tensor.
        """
        run = self._run
        if run is not None and output_names:
            out = run(list(output_names), feeds, None)
        else:
            out = self.session.run(list(output_names), feeds)
        return out if self._tensors_only else [o if isinstance(o, np.ndarray) else json_texts(o) for o in out]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _plain(value: Any) -> Any:
    """A map or sequence from onnxruntime as JSON-ready Python: keys as text, numbers as numbers."""
    if isinstance(value, dict):
        return {str(k.item() if isinstance(k, np.generic) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def json_texts(value: Any) -> np.ndarray:
    """A non-tensor output as a 1-D string tensor: one JSON text per element of a sequence
    (a row of a ZipMap output: {"0": 0.8, "1": 0.2}), or one for a lone map."""
    items = value if isinstance(value, (list, tuple)) else [value]
    # a fixed-width unicode array, not an object one: it travels as raw bytes like any tensor
    return np.array([json.dumps(_plain(item), allow_nan=True) for item in items], dtype=str)
