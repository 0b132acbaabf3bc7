"""The one set of rules for what names a model: its name, version, tags, description
and the sha256 digest of its bytes.

The store's catalog, the store and worker blob directories (a digest becomes a
file name), replication, and both gateways' uploads check with these, so a name
one part accepts is accepted everywhere. `ModelMeta` is the one metadata record
of a model version: the store's catalog row, what travels (`to_dict`), what a
worker resolves and what the gateway serves; `check_record` is its one check of
a record from a peer. Patterns are matched whole (`fullmatch`): "model\n" is not "model".
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from swarmd.errors import ERR_BAD_REQUEST, SwarmdError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+-]{0,63}$")
MAX_TAGS = 32
MAX_DESCRIPTION = 4096
LATEST = "latest"
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SwarmdError(
            ERR_BAD_REQUEST,
            f"model name must be 1-128 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {name!r:.80}",
        )
    return name


def check_version(version: object) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version) or version == LATEST:
        raise SwarmdError(
            ERR_BAD_REQUEST,
            f"model version must be 1-64 characters of letters, digits, '.', '_', '+' or '-' "
            f"starting with a letter or digit, and not 'latest'; got {version!r:.80}",
        )
    return version


def check_tags(tags: object) -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, (list, tuple)) or len(tags) > MAX_TAGS:
        raise SwarmdError(ERR_BAD_REQUEST, f"tags must be a list of at most {MAX_TAGS} strings")
    for t in tags:
        if not isinstance(t, str) or not TAG_RE.fullmatch(t):
            raise SwarmdError(
                ERR_BAD_REQUEST, f"tag must be 1-64 characters of letters, digits and '._:=+-', got {t!r:.80}"
            )
    return sorted(set(tags))


def check_description(text: object) -> str:
    if text is None:
        return ""
    if not isinstance(text, str) or len(text) > MAX_DESCRIPTION:
        raise SwarmdError(ERR_BAD_REQUEST, f"description must be a string of at most {MAX_DESCRIPTION} characters")
    return text


def check_digest(digest: object) -> str:
    """A sha256 hex digest (64 lowercase hex chars), or ERR_BAD_REQUEST."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise SwarmdError(ERR_BAD_REQUEST, f"digest must be 64 lowercase hex characters (sha256), got {digest!r:.80}")
    return digest


MAX_UPLOADER = 64  # a store's record names its uploader by hex public key
MAX_TENSORS = 1024  # inputs or outputs one record may declare


@dataclass
class ModelMeta:
    """One immutable model version (plus its mutable tombstone); inputs and outputs in
    TensorSpec.to_wire() form. `versions` is the gateway's list of the name's live versions."""

    name: str
    version: str
    digest: str
    size: int
    format: str = "onnx"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str = ""
    created: float = 0.0
    uploader: str = ""
    deleted: float | None = None
    updated: float = 0.0
    versions: list[str] = field(default_factory=list, compare=False)
    platform: ClassVar[str] = "onnxruntime_onnx"  # the OIP/Triton platform name of every model we run

    def to_dict(self, *, replication: bool = False) -> dict[str, Any]:
        """The contract's metadata dict; replicas also get the tombstone and its clock."""
        d = asdict(self)
        del d["versions"]
        if not replication:
            del d["deleted"], d["updated"]
        return d

    @cached_property
    def signature(self) -> Any:
        """The model's swarmd.signature.ModelSignature, which validates requests."""
        from swarmd.signature import ModelSignature, TensorSpec

        return ModelSignature(tuple(map(TensorSpec.from_wire, self.inputs)),
                              tuple(map(TensorSpec.from_wire, self.outputs)))


def _bad(what: str) -> SwarmdError:
    return SwarmdError(ERR_BAD_REQUEST, f"a model record's {what}")


def check_record(obj: Any) -> ModelMeta:
    """A model's metadata record from a peer (a store's getModel or listModels answer, a
    replication row), each field by the rules above; ERR_BAD_REQUEST names the first bad
    one. Optional fields may be absent; tags and description come back normalised."""
    if not isinstance(obj, dict):
        raise SwarmdError(ERR_BAD_REQUEST, f"a model record must be a map, got {type(obj).__name__}")
    name, version, digest = check_name(obj.get("name")), check_version(obj.get("version")), check_digest(obj.get("digest"))
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"size must be a non-negative integer, got {size!r:.40}")
    for key, limit in (("format", 16), ("uploader", MAX_UPLOADER)):
        v = obj.get(key, "")
        if not isinstance(v, str) or len(v) > limit:
            raise _bad(f"{key} must be a string of at most {limit} characters")
    for key in ("created", "updated", "deleted"):
        t = obj.get(key)
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t)):
            raise _bad(f"{key} must be a finite number, got {t!r:.40}")
    for key in ("inputs", "outputs"):
        v = obj.get(key) or []
        if not isinstance(v, list) or len(v) > MAX_TENSORS or not all(isinstance(t, dict) for t in v):
            raise _bad(f"{key} must be a list of at most {MAX_TENSORS} maps")
    deleted = obj.get("deleted")
    return ModelMeta(
        name, version, digest, size,
        obj.get("format", "onnx"), list(obj.get("inputs") or []), list(obj.get("outputs") or []),
        check_tags(obj.get("tags")), check_description(obj.get("description")), float(obj.get("created") or 0.0),
        obj.get("uploader", ""), None if deleted is None else float(deleted), float(obj.get("updated") or 0.0),
    )
