"""The one model-signature type and the one validation of requests against it.

A signature is read from the ONNX file at upload (swarmd.store.onnxsig), from a
loaded session (workers, the standalone gateway), and travels as `to_wire()`
in the store's metadata to the gateway (`from_wire`). Every request is checked
here before it is queued or run, so a bad request costs the caller a precise
message and costs the worker nothing: no batch is ever poisoned by a tensor of
the wrong shape or dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from swarmd.dtypes import ORT_TO_NUMPY
from swarmd.errors import ERR_BAD_REQUEST, SwarmdError


def _fmt_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, numpy dtype name, shape with -1 for a dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim0: str | None = field(default=None, compare=False)  # symbolic name of the first dim, if the model names it

    @classmethod
    def from_node_arg(cls, arg: Any) -> TensorSpec:
        """From an onnxruntime NodeArg; symbolic and unknown dims become -1."""
        dtype = ORT_TO_NUMPY.get(arg.type, arg.type)
        dims = list(arg.shape or ())
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
        dim0 = dims[0] if dims and isinstance(dims[0], str) and dims[0] else None
        return cls(arg.name, dtype, shape, dim0)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> TensorSpec:
        """From `to_wire()` form (a store's metadata record)."""
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d.get("shape") or ()))

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def describe(self) -> str:
        return f"'{self.name}' ({self.dtype} {_fmt_shape(self.shape)})"


@dataclass(frozen=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @cached_property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @cached_property
    def _known(self) -> tuple[frozenset[str], frozenset[str]]:
        """Input and output names as sets, built once: validate runs per request."""
        return frozenset(self.input_names), frozenset(self.output_names)

    @cached_property
    def _dtypes(self) -> tuple[np.dtype[Any] | None, ...]:
        """Each input's numpy dtype (None when its name is not one numpy knows): compared per
        request, where reading `arr.dtype.name` (a Python-level property) costs more."""
        out: list[np.dtype[Any] | None] = []
        for s in self.inputs:
            try:
                dt = np.dtype(s.dtype)
            except TypeError:
                dt = None
            out.append(dt if dt is not None and dt.name == s.dtype else None)  # never an alias
        return tuple(out)

    def _no_such(self, model: str, kind: str, name: str) -> SwarmdError:
        specs = self.inputs if kind == "input" else self.outputs
        return SwarmdError(ERR_BAD_REQUEST, f"model '{model}' has no {kind} {name[:100]!r}; its {kind}s are "
                           + ", ".join(s.describe() for s in specs))

    @property
    def batchable(self) -> bool:
        """True when rows can be stacked: every input and output has a dynamic first dim,
        and where the model names those dims it names them all alike (an output whose
        first dim is another symbol, e.g. a count of matches, is not one row per input row).
        """
        specs = self.inputs + self.outputs
        if not self.inputs or not all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs):
            return False
        return len({s.dim0 for s in specs if s.dim0 is not None}) <= 1

    def to_wire(self) -> dict[str, Any]:
        return {"inputs": [s.to_wire() for s in self.inputs], "outputs": [s.to_wire() for s in self.outputs]}

    def validate(
        self, model: str, inputs: Any, outputs: Any = None, *, batch: bool = False
    ) -> tuple[dict[str, np.ndarray], tuple[str, ...], int]:
        """Check a request; return (contiguous inputs, output names, rows).

        `rows` is the shared size of the first dim when `batch` is set (the
        request can be stacked with others), else 0. Raises ERR_BAD_REQUEST
        with what was wrong and what the model expects.
        """
        if not isinstance(inputs, dict):
            raise SwarmdError(
                ERR_BAD_REQUEST,
                f"inputs must be a map of input name to tensor, got {type(inputs).__name__}",
            )
        known_inputs, known_outputs = self._known
        for key in inputs:
            if key not in known_inputs:
                raise self._no_such(model, "input", str(key))
        feeds: dict[str, np.ndarray] = {}
        rows = -1
        first_name = ""
        for spec, want in zip(self.inputs, self._dtypes, strict=True):
            if spec.name not in inputs:
                raise SwarmdError(ERR_BAD_REQUEST, f"missing input {spec.describe()} of model '{model}'")
            arr = inputs[spec.name]
            if not isinstance(arr, np.ndarray):
                raise SwarmdError(
                    ERR_BAD_REQUEST,
                    f"input '{spec.name}' must be a tensor (dtype, shape, bytes), got {type(arr).__name__}",
                )
            if (
                (want is None or arr.dtype != want)
                and arr.dtype.name != spec.dtype
                and not (spec.dtype == "str" and arr.dtype.kind in "UO")
            ):
                raise SwarmdError(
                    ERR_BAD_REQUEST, f"input '{spec.name}' has dtype {arr.dtype.name}, expected {spec.dtype}"
                )
            if arr.ndim != len(spec.shape) or any(e != -1 and d != e for d, e in zip(arr.shape, spec.shape, strict=True)):
                raise SwarmdError(
                    ERR_BAD_REQUEST,
                    f"input '{spec.name}' has shape {_fmt_shape(arr.shape)}, expected {_fmt_shape(spec.shape)}",
                )
            if batch:
                if arr.shape[0] == 0:
                    raise SwarmdError(ERR_BAD_REQUEST, f"input '{spec.name}' has an empty batch (0 rows)")
                if rows == -1:
                    rows, first_name = arr.shape[0], spec.name
                elif arr.shape[0] != rows:
                    raise SwarmdError(
                        ERR_BAD_REQUEST,
                        f"inputs disagree on the batch size: '{first_name}' has {rows} rows, "
                        f"'{spec.name}' has {arr.shape[0]}",
                    )
            if not arr.dtype.isnative:  # a big-endian sender: onnxruntime wants native order
                arr = arr.astype(arr.dtype.newbyteorder("="))
            feeds[spec.name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        if outputs is None:
            names = self.output_names
        else:
            if not isinstance(outputs, (list, tuple)) or not all(isinstance(o, str) for o in outputs):
                raise SwarmdError(ERR_BAD_REQUEST, "outputs must be a list of output names")
            if not outputs:
                raise SwarmdError(ERR_BAD_REQUEST, "outputs is empty; omit it to get every output")
            for o in outputs:
                if o not in known_outputs:
                    raise self._no_such(model, "output", o)
            names = tuple(dict.fromkeys(outputs))
        return feeds, names, max(rows, 0)
