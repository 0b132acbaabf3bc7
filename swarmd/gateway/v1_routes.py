"""The gateway's /api/v1 routes (the seed's API): friendly inference, models and uploads,
status, API keys, metrics, OpenAPI/docs and the dashboard. A mixin of Gateway
(swarmd/gateway/server.py); permissions are in the route table (routes.py)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import BodyPartReader, web

from swarmd import __version__
from swarmd.dtypes import OIP_TO_NUMPY
from swarmd.errors import ERR_BAD_REQUEST, ERR_NOT_FOUND, ERR_TIMEOUT, ERR_TOO_LARGE, SwarmdError
from swarmd.gateway.backend import UploadedModel
from swarmd.gateway.keys import KeyStore
from swarmd.gateway.middleware import MODEL, RID, bad, json_response
from swarmd.gateway.openapi import docs_page, openapi_document
from swarmd.names import ModelMeta, check_description, check_name, check_tags, check_version

UPLOAD_CHUNK = 1 << 20
UPLOAD_FORM_FIELDS = ("name", "version", "tags", "description", "sha256")  # a multipart upload's other parts
UPLOAD_FIELD_MAX = 4096  # bytes of one such field


def _v1_output(value: np.ndarray, json_texts: bool) -> Any:
    """An output for /api/v1: numbers as they are; string tensors as lists (parsed when JSON texts)."""
    if value.dtype != object and value.dtype.kind not in "SU":
        return np.ascontiguousarray(value)
    items = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in value.ravel().tolist()]
    if json_texts:
        try:
            items = [orjson.loads(x) for x in items]
        except orjson.JSONDecodeError:
            pass  # not the JSON a worker makes of a sequence or map: leave the texts as they are
    if not value.ndim:
        return items[0]
    arr = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):  # one by one: a JSON list must stay one element, not grow a dim
        arr[i] = x
    return arr.reshape(value.shape).tolist()


def model_doc(m: ModelMeta) -> dict[str, Any]:
    """A model's /api/v1 document: its record (less the uploader), versions and platform."""
    d = m.to_dict()
    del d["uploader"]
    return {**d, "versions": list(m.versions or [m.version]), "platform": m.platform}


class V1Routes:
    """The /api/v1 handlers, metrics, docs and dashboard (a mixin: the attributes are Gateway's)."""

    async def v1_infer(self, request: web.Request) -> web.Response:
        """Friendly JSON: {"inputs": {name: nested list | {data, shape?, dtype?}}} or {"input": nested list}."""
        model = request.match_info["model"]
        doc = await self._json_body(request)
        version = doc.get("version", request.query.get("version"))
        if version is not None and not isinstance(version, str):
            raise bad("version must be a string")
        outputs = doc.get("outputs")
        if outputs is not None and (not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)):
            raise bad("outputs must be a list of output names")
        sig = (await self._metadata(request, model, version)).signature
        raw = doc.get("inputs")
        if raw is None and "input" in doc:
            if len(sig.inputs) != 1:
                raise bad(f"model {model!r} has {len(sig.inputs)} inputs; send them by name under \"inputs\"")
            raw = {sig.inputs[0].name: doc["input"]}
        if not isinstance(raw, dict) or not raw:
            raise bad('body must hold "inputs": {name: values} or, for a one-input model, "input": values')
        specs = {t.name: t for t in sig.inputs}
        inputs: dict[str, np.ndarray] = {}
        for name, value in raw.items():
            spec = specs.get(name)
            dtype = spec.dtype if spec is not None else "float32"
            shape = None
            if isinstance(value, dict):
                dtype = value.get("dtype", dtype)
                shape = value.get("shape")
                value = value.get("data")
                if dtype not in OIP_TO_NUMPY.values():
                    raise bad(f"input {name!r}: dtype {dtype!r:.40} is not one of {', '.join(OIP_TO_NUMPY.values())}")
            try:
                arr = np.array(value, dtype=np.dtype(dtype))
                if shape is not None:
                    arr = arr.reshape(shape)
            except (ValueError, TypeError, OverflowError) as e:
                raise bad(f"input {name!r} cannot be read as {dtype}: {e}") from None
            if arr.dtype == object:
                raise bad(f"input {name!r} must be numbers")
            if spec is not None and len(spec.shape) == arr.ndim + 1 and spec.shape[0] in (-1, 1):
                arr = arr[None, ...]  # one sample sent without the batch dimension
            inputs[name] = arr
        result = await self._infer(request, request.headers, model, version, inputs, outputs)
        # Non-tensor outputs (a ZipMap classifier's sequence of maps) arrive as JSON texts:
        # here they are JSON values again; other string tensors are lists of strings.
        texts = {t.name for t in sig.outputs if t.dtype == "object"}
        doc_out: dict[str, Any] = {
            "model": result.model,
            "version": result.version,
            "outputs": {k: _v1_output(v, k in texts) for k, v in result.outputs.items()},
            "request_id": request[RID],
        }
        if result.worker:
            doc_out["worker"] = result.worker
        return json_response(doc_out)

    async def v1_models(self, request: web.Request) -> web.Response:
        models = await self.backend.list_models()
        return json_response({"models": [model_doc(m) for m in models]})

    async def v1_model(self, request: web.Request) -> web.Response:
        info = await self._metadata(request, request.match_info["model"], request.query.get("version"))
        return json_response(model_doc(info))

    async def v1_upload(self, request: web.Request) -> web.Response:
        """JSON {"name", "version"?, "data": base64, ...} or a raw body streamed to disk (?name=...)."""
        uploads = self.data_dir / "gateway" / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=uploads, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                if request.content_type == "application/json":
                    upload = await self._upload_json(request, f, tmp)
                elif request.content_type == "multipart/form-data":
                    upload = await self._upload_multipart(request, f, tmp)
                else:
                    upload = await self._upload_stream(request, f, tmp)
            info = await self.backend.put_model(upload)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        request[MODEL] = info.name
        return json_response(model_doc(info), status=201)

    @staticmethod
    def _upload_fields(src: Any, tags: Any) -> tuple[str, str | None, str, list[str]]:
        """The upload's name, version, description and tags, by the rules every store applies (swarmd.names)."""
        name = src.get("name")
        if not name:
            raise bad("model name is required (\"name\" in the JSON body, or ?name= for a raw upload)")
        version = src.get("version")
        if isinstance(tags, str):
            tags = [t.strip() for t in tags.split(",") if t.strip()]
        return (check_name(name), None if version is None else check_version(version),
                check_description(src.get("description") or None), check_tags(tags))

    async def _upload_json(self, request: web.Request, f: Any, tmp: Path) -> UploadedModel:
        doc = await self._json_body(request, self.config.max_body_bytes)  # one base64 string: costs ~its size
        name, version, description, tags = self._upload_fields(doc, doc.get("tags"))
        data = doc.get("data")
        if not isinstance(data, str) or not data:
            raise bad("\"data\" must hold the model file as a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"\"data\" is not valid base64: {e}") from None
        f.write(raw)
        digest = hashlib.sha256(raw).hexdigest()
        self._check_sha(doc.get("sha256"), digest)
        return UploadedModel(name, version, tmp, len(raw), digest, tags, description)

    async def _upload_stream(self, request: web.Request, f: Any, tmp: Path) -> UploadedModel:
        q = request.query
        name, version, description, tags = self._upload_fields(q, q.get("tags"))
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise SwarmdError(ERR_TOO_LARGE, f"model is {request.content_length} bytes; the limit is {limit}")
        size, digest = await self._copy_upload(request.content.read, f)
        if size == 0:
            raise bad("upload body is empty; send the model file as the request body")
        self._check_sha(q.get("sha256") or request.headers.get("X-Model-Sha256"), digest)
        return UploadedModel(name, version, tmp, size, digest, tags, description)

    async def _upload_multipart(self, request: web.Request, f: Any, tmp: Path) -> UploadedModel:
        """`curl -F model=@m.onnx -F name=m`: the file part streamed to disk like a raw body, the
        other fields (name, version, tags, description, sha256) as form fields or in the query."""
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit + 64 * 1024:
            raise SwarmdError(ERR_TOO_LARGE, f"model is {request.content_length} bytes; the limit is {limit}")
        reader = await request.multipart()
        fields: dict[str, str] = {}
        got: tuple[int, str] | None = None
        for _ in range(len(UPLOAD_FORM_FIELDS) + 2):  # the file and each field once, plus the end
            async with asyncio.timeout(self.config.body_timeout):
                part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise bad("nested multipart bodies are not accepted; send the model file as one part")
            if part.filename is not None or part.name == "model":
                if got is not None:
                    raise bad("a multipart upload carries one model file (one part with a filename)")
                got = await self._copy_upload(part.read_chunk, f)
                continue
            if part.name not in UPLOAD_FORM_FIELDS or part.name in fields:
                raise bad(f"unexpected form field {part.name!r}: expected one file part (model=@FILE) and "
                          f"at most one each of {', '.join(UPLOAD_FORM_FIELDS)}")
            async with asyncio.timeout(self.config.body_timeout):
                raw = await part.read_chunk(UPLOAD_FIELD_MAX + 1)
            if len(raw) > UPLOAD_FIELD_MAX or await part.read_chunk(1):
                raise bad(f"form field {part.name!r} is over {UPLOAD_FIELD_MAX} bytes")
            fields[part.name] = raw.decode("utf-8", errors="replace")
        else:
            raise bad("too many parts in the multipart upload")
        if got is None or got[0] == 0:
            raise bad("multipart upload without a model file: send it as a part with a filename (-F model=@FILE)")
        src = {**request.query, **fields}
        name, version, description, tags = self._upload_fields(src, src.get("tags"))
        size, digest = got
        self._check_sha(src.get("sha256") or request.headers.get("X-Model-Sha256"), digest)
        return UploadedModel(name, version, tmp, size, digest, tags, description)

    async def _copy_upload(self, read: Callable[[int], Awaitable[bytes]], f: Any) -> tuple[int, str]:
        """Copy an upload body to f in chunks, each within body_timeout, bounded by max_upload_bytes;
        returns (size, sha256 hex)."""
        limit = self.config.max_upload_bytes
        h = hashlib.sha256()
        size = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.config.body_timeout):
                    chunk = await read(UPLOAD_CHUNK)
            except TimeoutError:
                raise SwarmdError(ERR_TIMEOUT, f"upload stalled for {self.config.body_timeout}s") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise SwarmdError(ERR_TOO_LARGE, f"model is over the upload limit of {limit} bytes")
            h.update(chunk)
            await loop.run_in_executor(None, f.write, chunk)
        return size, h.hexdigest()

    @staticmethod
    def _check_sha(claimed: Any, digest: str) -> None:
        if claimed is not None and claimed != digest:
            raise SwarmdError("ERR_CORRUPT" if isinstance(claimed, str) else ERR_BAD_REQUEST,
                              f"body sha256 is {digest}, the request claimed {claimed!r:.80}")

    async def v1_status(self, request: web.Request) -> web.Response:
        """Roles, peers, workers, models, orchestrators: what an operator asks first."""
        try:
            async with asyncio.timeout(5.0):
                models: Any = [f"{m.name}:{m.version}" for m in await self.backend.list_models()]
        except (SwarmdError, TimeoutError) as e:
            models = {"error": getattr(e, "message", "listing models timed out after 5s")}
        return json_response({
            "models": models,
            "gateway": self._gateway_summary(),
            "node": self._status() if self._status is not None else {},
            "backend": self.backend.status(),
        })

    # -- API keys (admin) ----------------------------------------------------------

    def _keystore(self) -> KeyStore:
        if self.keys is None:
            raise SwarmdError(ERR_NOT_FOUND, "this gateway has no key database")
        return self.keys

    async def keys_list(self, request: web.Request) -> web.Response:
        return json_response({"keys": [k.public() for k in self._keystore().list()]})

    async def keys_create(self, request: web.Request) -> web.Response:
        doc = await self._json_body(request)
        key, token = self._keystore().create(
            doc.get("name"), doc.get("permissions"),
            rate_rps=doc.get("rate_limit_rps"), rate_burst=doc.get("rate_limit_burst"),
        )
        self.log.bind(event="key_created", key=key.id, permissions=sorted(key.permissions)).info("API key created")
        return json_response({**key.public(), "key": token}, status=201)

    async def keys_get(self, request: web.Request) -> web.Response:
        return json_response(self._keystore().get(request.match_info["id"]).public())

    async def keys_revoke(self, request: web.Request) -> web.Response:
        key = self._keystore().revoke(request.match_info["id"])
        self.log.bind(event="key_revoked", key=key.id).info("API key revoked")
        return json_response({"revoked": key.public()})

    # -- metrics and docs -----------------------------------------------------------

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document(__version__))

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=docs_page(openapi_document(__version__)), content_type="text/html")

    # -- the operator dashboard (swarmd/gateway/dashboard.py) ------------------------

    async def dashboard_page(self, request: web.Request) -> web.Response:
        return await self.dashboard.page(request)  # static: no data, the feed needs a key

    async def dashboard_feed(self, request: web.Request) -> web.StreamResponse:
        return await self.dashboard.feed(request, self._gateway_summary)

