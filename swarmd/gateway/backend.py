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
from swarmd.names import check_record
from swarmd.signature import ModelSignature, TensorSpec
from swarmd.worker.result import InferResult


@dataclass
class ModelInfo:
    name: str
    version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    versions: list[str] = field(default_factory=list)
    platform: str = "onnxruntime_onnx"
    digest: str = ""
    size: int = 0
    tags: list[str] = field(default_factory=list)
    description: str = ""
    created: float = 0.0

    @property
    def signature(self) -> ModelSignature:
        """The model's signature, which validates requests (swarmd.signature)."""
        return ModelSignature(tuple(self.inputs), tuple(self.outputs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "versions": list(self.versions or [self.version]),
            "platform": self.platform,
            "digest": self.digest,
            "size": self.size,
            "format": "onnx",
            "inputs": [t.to_wire() for t in self.inputs],
            "outputs": [t.to_wire() for t in self.outputs],
            "tags": list(self.tags),
            "description": self.description,
            "created": self.created,
        }

    @classmethod
    def from_metadata(cls, d: dict[str, Any], versions: list[str] | None = None) -> ModelInfo:
        """From a store's model metadata record (see CONTRACTS.md), checked as stores check
        one (swarmd.names.check_record: ERR_BAD_REQUEST when it is not one)."""
        d = check_record(d)
        return cls(
            name=d["name"],
            version=d["version"],
            inputs=[TensorSpec.from_wire(t) for t in d.get("inputs") or []],
            outputs=[TensorSpec.from_wire(t) for t in d.get("outputs") or []],
            versions=versions or [d["version"]],
            digest=d["digest"],
            size=d["size"],
            tags=d["tags"],
            description=d["description"],
            created=float(d.get("created") or 0.0),
        )


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

    async def list_models(self) -> list[ModelInfo]: ...

    async def model_metadata(self, model: str, version: str | None = None) -> ModelInfo:
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

    async def put_model(self, upload: UploadedModel) -> ModelInfo: ...

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
