"""What the HTTP layer needs from whoever runs the models.

The gateway speaks HTTP; an InferenceBackend answers "which models, what
signature, is it ready, run it". Two real implementations exist: LocalBackend
(onnxruntime in this process, the standalone gateway) and SwarmBackend
(orchestrators, workers and stores over RPC). The HTTP layer is written and
tested against this interface once and serves either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from swarmd.errors import ERR_NOT_FOUND, SwarmdError
from swarmd.names import ModelMeta
from swarmd.worker.result import InferResult


@dataclass
class UploadedModel:
    """A model body the gateway has already received and hashed, on local disk."""

    name: str
    version: str | None
    path: Path
    size: int
    sha256: str
    tags: list[str] = field(default_factory=list)
    description: str = ""


class InferenceBackend(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def list_models(self) -> list[ModelMeta]: ...

    async def model_metadata(self, model: str, version: str | None = None) -> ModelMeta:
        """Raises SwarmdError(ERR_NOT_FOUND) for an unknown model or version."""
        ...

    async def ready(self, model: str, version: str | None = None) -> bool: ...

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None = None,
        request_id: str | None = None,
    ) -> InferResult: ...

    async def put_model(self, upload: UploadedModel) -> ModelMeta: ...

    def status(self) -> dict[str, Any]: ...

    def worker_count(self) -> int: ...

    async def model_statistics(self, model: str | None, version: str | None) -> list[dict[str, Any]]:
        """Triton's statistics extension: one entry per model version, summed over workers."""
        ...

    async def repository_index(self) -> list[dict[str, str]]:
        """Triton's repository index: {name, version, state (READY | UNAVAILABLE), reason} per
        model version the backend knows."""
        ...

    async def load_model(self, model: str) -> dict[str, Any]:
        """Triton's repository load: make the model's versions ready to serve (ERR_NOT_FOUND
        when no repository has it); what was done, for the answer."""
        ...

    async def unload_model(self, model: str) -> dict[str, Any]:
        """Triton's repository unload: drop the model from memory; what was done."""
        ...


def not_found(model: str, version: str | None) -> SwarmdError:
    if version is None:
        return SwarmdError(ERR_NOT_FOUND, f"unknown model {model!r}")
    return SwarmdError(ERR_NOT_FOUND, f"unknown version {version!r} of model {model!r}")
