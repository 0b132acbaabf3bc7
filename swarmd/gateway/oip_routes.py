"""The gateway's Open Inference Protocol v2 routes (KServe/Triton REST): health, server and
model metadata, readiness, statistics, model control and inference. A mixin of Gateway
(swarmd/gateway/server.py); permissions are in the route table (routes.py)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from swarmd import __version__
from swarmd.dtypes import TRITON_TYPES
from swarmd.errors import ERR_INTERNAL, ERR_NOT_IMPLEMENTED, ERR_NOT_READY, ERR_TOO_LARGE, SwarmdError
from swarmd.gateway.middleware import MODEL, bad, json_response
from swarmd.gateway.oip import OipError, decode_infer_request, encode_infer_response, oip_datatype
from swarmd.names import ModelMeta


def tensor_meta(info: ModelMeta, which: str) -> list[dict[str, Any]]:
    specs = info.signature.inputs if which == "inputs" else info.signature.outputs
    return [{"name": t.name, "datatype": oip_datatype(t.dtype), "shape": list(t.shape)} for t in specs]


class OipRoutes:
    """The OIP v2 handlers (a mixin: the attributes are Gateway's)."""

    async def health(self, request: web.Request) -> web.Response:
        workers = self.backend.worker_count()
        return json_response({
            "status": "ok" if workers > 0 else "degraded",
            "version": __version__,
            "uptime": round(time.time() - self._started, 3),
            "workers": workers,
        })

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if self.backend.worker_count() == 0:
            raise SwarmdError(ERR_NOT_READY, "no worker is available to serve inference yet")
        return json_response({"ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({
            "name": self.name,
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_repository"],
        })

    async def repository_index(self, request: web.Request) -> web.Response:
        """Triton's repository index; body {"ready": true} (optional) lists only READY versions."""
        doc = await self._optional_json(request, {})
        if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
            raise bad('repository index body must be a JSON object, {"ready": true|false}')
        return json_response(self._index_rows(await self.backend.repository_index(), doc.get("ready", False)))

    async def _optional_json(self, request: web.Request, empty: Any) -> Any:
        """A JSON body Triton's clients may leave out (`empty` then), bounded by max_json_bytes."""
        body = await self._body(request, self.config.max_json_bytes, self.JSON_BODY)
        if not body.strip():
            return empty
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise bad(f"request body is not valid JSON: {e}") from None

    @staticmethod
    def _index_rows(rows: list[dict[str, str]], ready: bool) -> list[dict[str, str]]:
        """Rows in Triton's shape (no empty reason), only READY ones when asked."""
        return [{k: v for k, v in r.items() if k != "reason" or v} for r in rows if not ready or r["state"] == "READY"]

    async def model_control_call(self, action: str, model: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """A repository load or unload, as both fronts take it: parameters that would change the
        model (a config override, model files) are refused: swarmd models come from the stores."""
        if action == "load":
            extra = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
            if extra:
                raise SwarmdError(
                    ERR_NOT_IMPLEMENTED,
                    f"model loading with {', '.join(extra)} is not supported: a swarmd model is an ONNX file in "
                    "the stores; push it (POST /api/v1/models or `swarmd model push`), then load it by name",
                )
            out = await self.backend.load_model(model)
        else:
            out = await self.backend.unload_model(model)  # unload_dependents: no ensembles, nothing depends
        self.log.bind(event=f"model_{action}", model=model).info("repository {} of {}", action, model)
        return out

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = await self._metadata(request, request.match_info["model"], request.match_info.get("version"))
        return json_response({
            "name": info.name,
            "versions": list(info.versions or [info.version]),
            "platform": info.platform,
            "inputs": tensor_meta(info, "inputs"),
            "outputs": tensor_meta(info, "outputs"),
        })

    async def model_config(self, request: web.Request) -> web.Response:
        info = await self._metadata(request, request.match_info["model"], request.match_info.get("version"))

        def cfg(t: dict[str, Any]) -> dict[str, Any]:
            return {"name": t["name"], "data_type": TRITON_TYPES.get(t["datatype"], t["datatype"]), "dims": t["shape"]}

        return json_response({
            "name": info.name,
            "platform": info.platform,
            "backend": "onnxruntime",
            "max_batch_size": 0,
            "input": [cfg(t) for t in tensor_meta(info, "inputs")],
            "output": [cfg(t) for t in tensor_meta(info, "outputs")],
        })

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version")
        info = await self._metadata(request, model, version)
        if not await self.backend.ready(info.name, version):
            raise SwarmdError(ERR_NOT_READY, f"model {model!r} has no ready worker yet")
        return json_response({"name": info.name, "ready": True})

    async def model_stats(self, request: web.Request) -> web.Response:
        """Triton's statistics extension: {"model_stats": [...]} summed over the workers."""
        model, version = request.match_info.get("model"), request.match_info.get("version")
        if model is not None:
            await self._metadata(request, model, version)  # an unknown model or version is a 404
        return json_response({"model_stats": await self.backend.model_statistics(model, version)})

    async def model_control(self, request: web.Request) -> web.Response:
        """Triton's repository load/unload: {"parameters": {...}} (optional) as tritonclient sends it."""
        action = request.path.rsplit("/", 1)[-1]
        model = request.match_info["model"]
        request[MODEL] = model
        doc = await self._optional_json(request, {})
        params = doc.get("parameters", {}) if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            raise bad(f'{action} body must be a JSON object, {{"parameters": {{...}}}}')
        return json_response(await self.model_control_call(action, model, params))

    UNSUPPORTED = {
        "trace": "trace settings: swarmd traces with OpenTelemetry, configured per node in [tracing] (docs/triton.md)",
        "logging": "log settings: set node.log_level in the node's configuration",
        "systemsharedmemory": "system shared memory: tensors travel in the request (binary tensor extension)",
        "cudasharedmemory": "CUDA shared memory: tensors travel in the request (binary tensor extension)",
    }

    async def triton_unsupported(self, request: web.Request) -> web.Response:
        """Triton routes swarmd has no equivalent for: 501 naming the feature, not a bare 404."""
        parts = request.path.split("/")
        feature = "trace" if "trace" in parts else parts[2]
        raise SwarmdError(ERR_NOT_IMPLEMENTED, f"swarmd gateway does not implement {self.UNSUPPORTED[feature]}")

    async def oip_infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version")
        header_length = self._oip_header_length(request.headers.get("Inference-Header-Content-Length"))
        if header_length is None:
            body = await self._body(request, self.config.max_json_bytes, self.JSON_BODY)
        else:
            body = await self._body(request)
        out, header_len = await self._oip_answer(request, request.headers, model, version, body, header_length)
        if header_len is None:
            return web.Response(body=out, content_type="application/json")
        return web.Response(
            body=out, content_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_len)},
        )

    # -- shared with the lean lane (fastlane.py), which serves the same two routes ------

    def _oip_header_length(self, hl: str | None) -> int | None:
        """Inference-Header-Content-Length (the binary extension's JSON part), checked; None when not sent."""
        if hl is None:
            return None
        hl = hl.strip()
        if not (hl.isascii() and hl.isdigit()) or len(hl) > 15:  # not "²": int() refuses it
            raise bad(f"Inference-Header-Content-Length must be a decimal byte count, got {hl!r:.40}")
        header_length = int(hl)
        if header_length > self.config.max_json_bytes:
            raise SwarmdError(ERR_TOO_LARGE, f"the {self.JSON_BODY} is {header_length} bytes; "
                                             f"the limit is {self.config.max_json_bytes}")
        return header_length

    async def _oip_answer(self, state: Any, carrier: Any, model: str, version: str | None, body: bytes,
                          header_length: int | None) -> tuple[bytes, int | None]:
        """Decode an infer body, run it, encode the answer: (body, JSON header length when binary).
        `state` keeps the request's id and, once known, its model (metrics); `carrier` its headers."""
        try:
            req = decode_infer_request(body, header_length)
        except OipError as e:
            raise bad(str(e)) from None
        names = None if req.outputs is None else [o.name for o in req.outputs]
        result = await self._infer(state, carrier, model, version, req.inputs, names)
        if names is not None:
            missing = [n for n in names if n not in result.outputs]
            if missing:
                raise SwarmdError(ERR_INTERNAL, f"backend returned no output {missing[0]!r}")
        return encode_infer_response(result.model, result.version, result.outputs, req)
