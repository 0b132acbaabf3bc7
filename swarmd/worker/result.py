"""What one inference answers, from the worker's engine to the gateway and the client library.

One type all the way: the engine returns it, runInference sends it as
`to_wire()`, and the router's callers (the gateway, swarmd_rpc) read the
answer back with `from_wire()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from swarmd.errors import ERR_PROTOCOL, SwarmdError


@dataclass
class InferResult:
    """One inference's answer: the outputs, which model version computed them and on which worker."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    worker: str | None = None  # hex public key of the worker that ran it, when known

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "version": self.version, "outputs": self.outputs}
        if self.worker is not None:
            out["worker"] = self.worker
        return out

    @classmethod
    def from_wire(cls, res: Any, model: str, worker: str | None = None) -> InferResult:
        """A runInference (or routeInferenceRequest) answer; `worker` when the answer does not name one."""
        if not isinstance(res, dict) or not isinstance(res.get("outputs"), dict):
            raise SwarmdError(ERR_PROTOCOL, "runInference answered without an outputs map")
        named = res.get("worker")
        return cls(
            model=str(res.get("model", model)),
            version=str(res.get("version", "")),
            outputs={str(k): np.asarray(v) for k, v in res["outputs"].items()},
            worker=named if isinstance(named, str) else worker,
        )
