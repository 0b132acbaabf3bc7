"""The Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService` on `gateway.grpc`.

Same backend, keys, permissions, rate limits, timeouts and error vocabulary as the HTTP
front (swarmd/gateway/server.py); only the framing differs. Stock `tritonclient.grpc`
works against it. Messages come from swarmd/gateway/proto/oip.proto (`make proto`
regenerates oip_pb2.py, in a descriptor pool of its own so that a process that also
imports tritonclient's copy of the same package does not clash).

API keys travel in the `x-api-key` metadata (or `authorization: Bearer <key>`). Errors are
gRPC statuses whose details read `ERR_CODE: message`. Methods of Triton's service that
swarmd has no equivalent for (shared memory, trace and log settings) answer UNIMPLEMENTED
naming the feature.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from loguru import logger

from swarmd import __version__
from swarmd.dtypes import CONTENTS_FIELD, TRITON_TYPES
from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_INTERNAL,
    GATEWAY_STATUS,
    SwarmdError,
)
from swarmd.gateway.oip import OipError, decode_raw_tensor, encode_raw_tensor, numpy_dtype
from swarmd.gateway.proto import oip_pb2 as pb
from swarmd.gateway.server import tensor_meta
from swarmd.node import tracing

if TYPE_CHECKING:
    from swarmd.gateway.server import Gateway

SERVICE = "inference.GRPCInferenceService"
PUBLIC = "public"

STATUS: dict[str, grpc.StatusCode] = {code: getattr(grpc.StatusCode, name) for code, (_, name) in GATEWAY_STATUS.items()}

# Triton's model configuration data types (the gRPC DataType enum), by OIP datatype name.
CONFIG_TYPES: dict[str, int] = {oip: getattr(pb, name) for oip, name in TRITON_TYPES.items()}
# What each Triton method swarmd does not serve is, for the UNIMPLEMENTED answer.
NOT_BUILT = {
    "TraceSetting": "trace settings: swarmd traces with OpenTelemetry, configured per node in [tracing] "
                    "(docs/triton.md)",
    "LogSettings": "log settings: set node.log_level in the node's configuration",
}


def decode_request(req: Any) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Inputs as numpy arrays and the requested output names (None: all) of a ModelInferRequest.
    Raises OipError naming the tensor that is wrong."""
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise OipError(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs; "
                       "send every input raw or none")
    if not req.inputs:
        raise OipError("the request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        where = f"input {t.name!r}"
        if not t.name:
            raise OipError(f"input #{i} has no name")
        if t.name in inputs:
            raise OipError(f"{where} appears twice")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise OipError(f"{where}.shape must hold non-negative integers, got {list(shape)}")
        if raw:
            inputs[t.name] = decode_raw_tensor(memoryview(raw[i]), t.datatype, shape, where)
            continue
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            if t.datatype in ("FP16", "BF16"):
                raise OipError(f"{where}: {t.datatype} data travels only in raw_input_contents")
            numpy_dtype(t.datatype)  # raises the precise "datatype not supported" sentence
        values = getattr(t.contents, field)
        count = math.prod(shape)
        if len(values) != count:
            raise OipError(f"{where}.contents.{field} has {len(values)} elements but shape {list(shape)} needs {count}")
        if t.datatype == "BYTES":
            arr = np.empty(count, dtype=object)
            arr[:] = list(values)
        else:
            arr = np.asarray(values, dtype=numpy_dtype(t.datatype))
        inputs[t.name] = arr.reshape(shape)
    names = [o.name for o in req.outputs] or None
    return inputs, names


def encode_response(model: str, version: str, rid: str, outputs: dict[str, np.ndarray],
                    names: list[str] | None) -> Any:
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=rid)
    for name in names or list(outputs):
        arr = np.asarray(outputs[name])
        datatype, raw = encode_raw_tensor(arr)
        resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(raw)
    return resp


class GrpcFront:
    """One grpc.aio server in front of a Gateway's backend, sharing its keys and limits."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.log = logger.bind(role="gateway", part="grpc")

    async def start(self, host: str, port: int) -> int:
        limit = self.gw.config.max_body_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ])
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        unary = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryModelLoad": (self.repository_model_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": (self.repository_model_unload, pb.RepositoryModelUnloadRequest),
        }
        for name, (fn, req_type) in unary.items():
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._wrap(name, fn), request_deserializer=req_type.FromString,
                response_serializer=lambda m: m.SerializeToString())
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(SERVICE, handlers), _Unimplemented()))
        bound = self.server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if bound == 0:
            self.server = None
            raise SwarmdError("ERR_CONFIG", f"gateway cannot listen for gRPC on {host}:{port}")
        await self.server.start()
        self.port = bound
        return bound

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=2.0)
            self.server = None

    # -- the glue every call goes through ------------------------------------------

    PERMISSIONS: dict[str, str] = {
        "ServerLive": PUBLIC, "ServerReady": PUBLIC, "ModelReady": "models:read", "ServerMetadata": "models:read",
        "ModelMetadata": "models:read", "ModelConfig": "models:read", "RepositoryIndex": "models:read",
        "ModelStatistics": "models:read", "RepositoryModelLoad": "models:write", "RepositoryModelUnload": "models:write",
        "ModelInfer": "infer", "ModelStreamInfer": "infer",
    }

    def _authorize(self, name: str, context: grpc.aio.ServicerContext) -> None:
        permission = self.PERMISSIONS[name]
        if permission == PUBLIC:
            return
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        peer = context.peer() or "?"
        remote = peer.rsplit(":", 1)[0] if ":" in peer else peer
        self.gw.authorize(md.get("x-api-key"), md.get("authorization"), remote, permission)

    def _wrap(self, name: str, fn: Callable[[Any], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        route = f"grpc:{name}"

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            status = "200"
            try:
                self._authorize(name, context)
                if tracing.tracer is not None and name == "ModelInfer":
                    return await self.model_infer(request, dict(context.invocation_metadata() or ()))
                return await fn(request)
            except SwarmdError as e:
                status = str(self.gw.http_status(e.code))
                if int(status) >= 500:
                    self.gw.dashboard.note_error(route, int(status), e.code, e.message)
                await context.abort(STATUS.get(e.code, grpc.StatusCode.UNKNOWN), f"{e.code}: {e.message}")
            except OipError as e:
                status = "400"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{ERR_BAD_REQUEST}: {e}")
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                status = "500"
                self.log.opt(exception=e).bind(event="grpc_bug", method=name).error("unhandled error in {}", name)
                self.gw.dashboard.note_error(route, 500, ERR_INTERNAL, f"internal error in {name}")
                await context.abort(grpc.StatusCode.INTERNAL, f"{ERR_INTERNAL}: internal error in {name}")
            finally:
                self.gw.observe(route, "GRPC", status, time.perf_counter() - t0, getattr(request, "model_name", ""))

        return call

    # -- health and metadata -----------------------------------------------------------

    async def server_live(self, request: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.gw.backend.worker_count() > 0)

    async def server_metadata(self, request: Any) -> Any:
        return pb.ServerMetadataResponse(name=self.gw.name, version=__version__,
                                         extensions=["binary_tensor_data", "model_repository"])

    async def model_ready(self, request: Any) -> Any:
        info = await self.gw.metadata(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=await self.gw.backend.ready(info.name, request.version or None))

    async def model_metadata(self, request: Any) -> Any:
        info = await self.gw.metadata(request.name, request.version or None)
        resp = pb.ModelMetadataResponse(name=info.name, versions=list(info.versions or [info.version]),
                                        platform=info.platform)
        for which, target in (("inputs", resp.inputs), ("outputs", resp.outputs)):
            for t in tensor_meta(info, which):
                target.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def model_config(self, request: Any) -> Any:
        info = await self.gw.metadata(request.name, request.version or None)
        cfg = pb.ModelConfig(name=info.name, platform=info.platform, backend="onnxruntime", max_batch_size=0)
        for t in tensor_meta(info, "inputs"):
            cfg.input.add(name=t["name"], data_type=CONFIG_TYPES.get(t["datatype"], pb.TYPE_INVALID), dims=t["shape"])
        for t in tensor_meta(info, "outputs"):
            cfg.output.add(name=t["name"], data_type=CONFIG_TYPES.get(t["datatype"], pb.TYPE_INVALID), dims=t["shape"])
        return pb.ModelConfigResponse(config=cfg)

    async def model_statistics(self, request: Any) -> Any:
        if request.name:
            await self.gw.metadata(request.name, request.version or None)
        resp = pb.ModelStatisticsResponse()
        for doc in await self.gw.backend.model_statistics(request.name or None, request.version or None):
            s = resp.model_stats.add(name=doc["name"], version=doc["version"], last_inference=doc["last_inference"],
                                     inference_count=doc["inference_count"], execution_count=doc["execution_count"])
            for phase, d in doc["inference_stats"].items():
                getattr(s.inference_stats, phase).CopyFrom(pb.StatisticDuration(**d))
            for b in doc["batch_stats"]:
                s.batch_stats.add(batch_size=b["batch_size"], **{k: pb.StatisticDuration(**b[k]) for k in
                                                                 ("compute_input", "compute_infer", "compute_output")})
        return resp

    async def repository_index(self, request: Any) -> Any:
        resp = pb.RepositoryIndexResponse()
        for row in self.gw._index_rows(await self.gw.backend.repository_index(), request.ready):
            resp.models.add(**row)
        return resp

    @staticmethod
    def _parameters(request: Any) -> dict[str, Any]:
        return {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in request.parameters.items()}

    async def repository_model_load(self, request: Any) -> Any:
        await self.gw.model_control_call("load", request.model_name, self._parameters(request))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any) -> Any:
        await self.gw.model_control_call("unload", request.model_name, self._parameters(request))
        return pb.RepositoryModelUnloadResponse()

    # -- inference ----------------------------------------------------------------------

    async def model_infer(self, request: Any, carrier: dict[str, Any] | None = None) -> Any:
        """One inference; `carrier` (the call's metadata, given while tracing is on) may name the
        caller's trace in a W3C `traceparent`."""
        inputs, names = decode_request(request)
        if carrier is None:
            result = await self.gw.infer(request.model_name, request.model_version or None, inputs, names,
                                         request.id or None)
        else:
            result = await self.gw.infer_traced(carrier, "grpc", request.model_name, request.model_version or None,
                                                inputs, names, request.id or None)
        missing = [n for n in names or () if n not in result.outputs]
        if missing:
            raise SwarmdError(ERR_INTERNAL, f"backend returned no output {missing[0]!r}")
        return encode_response(result.model, result.version, request.id, result.outputs, names)

    async def model_stream_infer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[Any]:
        """Bidirectional stream: each request answered in order; a failed one answers with its
        error_message and the stream goes on."""
        try:
            self._authorize("ModelStreamInfer", context)
        except SwarmdError as e:
            await context.abort(STATUS.get(e.code, grpc.StatusCode.UNKNOWN), f"{e.code}: {e.message}")
        # while tracing is on, each request of the stream is a gateway.infer span in the trace
        # the stream's metadata names (a stream has one set of metadata)
        carrier = dict(context.invocation_metadata() or ()) if tracing.tracer is not None else None
        async for request in requests:
            t0, status = time.perf_counter(), "200"
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self.model_infer(request, carrier))
            except SwarmdError as e:
                status = str(self.gw.http_status(e.code))
                yield pb.ModelStreamInferResponse(error_message=f"{e.code}: {e.message}",
                                                  infer_response=pb.ModelInferResponse(id=request.id))
            except OipError as e:
                status = "400"
                yield pb.ModelStreamInferResponse(error_message=f"{ERR_BAD_REQUEST}: {e}",
                                                  infer_response=pb.ModelInferResponse(id=request.id))
            finally:
                self.gw.observe("grpc:ModelStreamInfer", "GRPC", status, time.perf_counter() - t0, request.model_name)


class _Unimplemented(grpc.GenericRpcHandler):
    """Any other method of the service (or of another service): UNIMPLEMENTED with a reason."""

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler_call_details.method.startswith(f"/{SERVICE}/"):
            why = NOT_BUILT.get(method, f"{method} is a Triton feature swarmd has no equivalent for "
                                        "(system and CUDA shared memory: tensors travel in the request)")
        else:
            why = f"unknown service method {handler_call_details.method}"

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"swarmd gateway does not implement {method}: {why}")
            return b""

        return grpc.unary_unary_rpc_method_handler(refuse)


__all__ = ["GrpcFront", "decode_request", "encode_response"]
