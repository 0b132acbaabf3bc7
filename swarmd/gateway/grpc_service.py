"""The Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService`, engine-free.

One implementation of each method, served by either engine (gateway.grpc_engine): the
lean HTTP/2 lane (grpc_lane.py, the default) or grpcio's asyncio server (grpc_server.py).
Same backend, keys, permissions, rate limits, in-flight bound, timeouts and error
vocabulary as the HTTP front (swarmd/gateway/server.py); only the framing differs. Stock
`tritonclient.grpc` works against both. Messages come from swarmd/gateway/proto/oip.proto
(`make proto` regenerates oip_pb2.py, in a descriptor pool of its own so that a process
that also imports tritonclient's copy of the same package does not clash).

API keys travel in the `x-api-key` metadata (or `authorization: Bearer <key>`). Errors are
gRPC statuses (numbers, grpc_wire.GRPC_STATUS) whose details read `ERR_CODE: message`.
Methods of Triton's service that swarmd has no equivalent for (shared memory, trace and
log settings) answer UNIMPLEMENTED naming the feature.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.message import DecodeError
from loguru import logger

from swarmd import __version__
from swarmd.dtypes import CONTENTS_FIELD, TRITON_TYPES
from swarmd.errors import ERR_BAD_REQUEST, ERR_INTERNAL, GATEWAY_STATUS, SwarmdError
from swarmd.gateway.grpc_wire import GRPC_STATUS
from swarmd.gateway.oip import OipError, decode_raw_tensor, encode_raw_tensor, numpy_dtype
from swarmd.gateway.proto import oip_pb2 as pb
from swarmd.gateway.server import tensor_meta
from swarmd.node import tracing

if TYPE_CHECKING:
    from swarmd.gateway.server import Gateway

SERVICE = "inference.GRPCInferenceService"
PUBLIC = "public"

# a SwarmdError's code -> the gRPC status it is answered with (errors.GATEWAY_STATUS); others: UNKNOWN
STATUS: dict[str, int] = {code: GRPC_STATUS[name] for code, (_, name) in GATEWAY_STATUS.items()}
INVALID_ARGUMENT = GRPC_STATUS["INVALID_ARGUMENT"]
INTERNAL = GRPC_STATUS["INTERNAL"]
UNIMPLEMENTED = GRPC_STATUS["UNIMPLEMENTED"]

# Triton's model configuration data types (the gRPC DataType enum), by OIP datatype name.
CONFIG_TYPES: dict[str, int] = {oip: getattr(pb, name) for oip, name in TRITON_TYPES.items()}
# What each Triton method swarmd does not serve is, for the UNIMPLEMENTED answer.
NOT_BUILT = {
    "TraceSetting": "trace settings: swarmd traces with OpenTelemetry, configured per node in [tracing] "
                    "(docs/triton.md)",
    "LogSettings": "log settings: set node.log_level in the node's configuration",
}


class GrpcAbort(Exception):
    """A call's failure as gRPC answers it: a status number and its details (`ERR_CODE: message`)."""

    def __init__(self, status: int, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def unimplemented(path: str) -> GrpcAbort:
    """The UNIMPLEMENTED answer to a method path this service does not serve, naming why."""
    method = path.rsplit("/", 1)[-1]
    if path.startswith(f"/{SERVICE}/"):
        why = NOT_BUILT.get(method, f"{method} is a Triton feature swarmd has no equivalent for "
                                    "(system and CUDA shared memory: tensors travel in the request)")
    else:
        why = f"unknown service method {path}"
    return GrpcAbort(UNIMPLEMENTED, f"swarmd gateway does not implement {method}: {why}")


def decode_request(req: Any) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Inputs as numpy arrays and the requested output names (None: all) of a ModelInferRequest.
    Raises OipError naming the tensor that is wrong. Raw contents become arrays over the
    request's own bytes (no copy). Each read of a protobuf field builds a new Python object
    (~0.3-1 µs), so every field is read once and sentences are built only on failure."""
    specs = req.inputs
    n = len(specs)
    raw = req.raw_input_contents
    nraw = len(raw)
    if nraw and nraw != n:
        raise OipError(f"raw_input_contents has {nraw} entries for {n} inputs; send every input raw or none")
    if not n:
        raise OipError("the request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    for i in range(n):
        t = specs[i]
        name = t.name
        if not name:
            raise OipError(f"input #{i} has no name")
        if name in inputs:
            raise OipError(f"input {name!r} appears twice")
        shape = tuple(t.shape)  # ints already (int64 field)
        if shape and min(shape) < 0:
            raise OipError(f"input {name!r}.shape must hold non-negative integers, got {list(shape)}")
        datatype = t.datatype
        if nraw:
            inputs[name] = decode_raw_tensor(raw[i], datatype, shape, f"input {name!r}")
            continue
        where = f"input {name!r}"
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            if datatype in ("FP16", "BF16"):
                raise OipError(f"{where}: {datatype} data travels only in raw_input_contents")
            numpy_dtype(datatype)  # raises the precise "datatype not supported" sentence
        values = getattr(t.contents, field)
        count = math.prod(shape)
        if len(values) != count:
            raise OipError(f"{where}.contents.{field} has {len(values)} elements but shape {list(shape)} needs {count}")
        if datatype == "BYTES":
            arr = np.empty(count, dtype=object)
            arr[:] = list(values)
        else:
            arr = np.asarray(values, dtype=numpy_dtype(datatype))
        inputs[name] = arr.reshape(shape)
    outs = req.outputs
    return inputs, ([o.name for o in outs] if len(outs) else None)


def encode_response(model: str, version: str, rid: str, outputs: dict[str, np.ndarray],
                    names: list[str] | None) -> Any:
    """The ModelInferResponse: every output as raw_output_contents, its bytes straight from the
    array (encode_raw_tensor), built in place in the message (no intermediate lists or dicts)."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=rid)
    add, append = resp.outputs.add, resp.raw_output_contents.append
    for name in names or outputs:
        arr = outputs[name]
        if type(arr) is not np.ndarray:
            arr = np.asarray(arr)
        datatype, raw = encode_raw_tensor(arr)
        add(name=name, datatype=datatype, shape=arr.shape)
        append(raw)
    return resp


class SoonInfer:
    """A ModelInfer being served without a Task (OipService.infer_soon): what its answer needs."""

    __slots__ = ("entry", "future", "names", "request", "started")

    def __init__(self, request: Any, names: list[str] | None, future: asyncio.Future[Any], entry: Any,
                 started: float) -> None:
        self.request, self.names, self.future, self.entry, self.started = request, names, future, entry, started


class OipService:
    """The methods of inference.GRPCInferenceService over one Gateway, whatever carries them."""

    PERMISSIONS: dict[str, str] = {
        "ServerLive": PUBLIC, "ServerReady": PUBLIC, "ModelReady": "models:read", "ServerMetadata": "models:read",
        "ModelMetadata": "models:read", "ModelConfig": "models:read", "RepositoryIndex": "models:read",
        "ModelStatistics": "models:read", "RepositoryModelLoad": "models:write", "RepositoryModelUnload": "models:write",
        "ModelInfer": "infer", "ModelStreamInfer": "infer",
    }

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.log = logger.bind(role="gateway", part="grpc")
        # unary method name -> (its implementation, its request message type)
        self.unary: dict[str, tuple[Any, Any]] = {
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

    # -- the glue every call goes through ------------------------------------------

    def authorize(self, name: str, metadata: Mapping[str, str], remote: str) -> None:
        """The key check and rate limit of `name` (lower-case metadata names); raises SwarmdError."""
        permission = self.PERMISSIONS[name]
        if permission != PUBLIC:
            self.gw.authorize(metadata.get("x-api-key"), metadata.get("authorization"), remote, permission)

    def abort_for(self, name: str, e: BaseException) -> GrpcAbort:
        """What a failed call answers; 5xx-class ones go to the dashboard's error list, bugs to the log."""
        route = f"grpc:{name}"
        if isinstance(e, SwarmdError):
            http = self.gw.http_status(e.code)
            if http >= 500:
                self.gw.dashboard.note_error(route, http, e.code, e.message)
            return GrpcAbort(STATUS.get(e.code, GRPC_STATUS["UNKNOWN"]), f"{e.code}: {e.message}")
        if isinstance(e, OipError):
            return GrpcAbort(INVALID_ARGUMENT, f"{ERR_BAD_REQUEST}: {e}")
        if isinstance(e, DecodeError):
            return GrpcAbort(INVALID_ARGUMENT, f"{ERR_BAD_REQUEST}: the {name} request is not a valid protobuf "
                                               f"message: {e}")
        self.log.opt(exception=e).bind(event="grpc_bug", method=name).error("unhandled error in {}", name)
        self.gw.dashboard.note_error(route, 500, ERR_INTERNAL, f"internal error in {name}")
        return GrpcAbort(INTERNAL, f"{ERR_INTERNAL}: internal error in {name}")

    @staticmethod
    def _status_label(abort: GrpcAbort | None, e: BaseException | None) -> str:
        if abort is None:
            return "200"
        if isinstance(e, SwarmdError):
            return str(GATEWAY_STATUS.get(e.code, (502, ""))[0])
        return "400" if abort.status == INVALID_ARGUMENT else "500"

    async def call(self, name: str, request: Any, metadata: Mapping[str, str], remote: str) -> Any:
        """One unary call (`name` in self.unary): admission, keys, the method, metrics; raises GrpcAbort."""
        gw = self.gw
        t0 = time.perf_counter()
        abort: GrpcAbort | None = None
        failure: BaseException | None = None
        gw._in_flight += 1  # the HTTP front's in-flight bound (middleware._admit) covers gRPC calls too
        try:
            gw._admit()
            self.authorize(name, metadata, remote)
            if name == "ModelInfer":
                return await self.model_infer(request, dict(metadata) if tracing.tracer is not None else None)
            return await self.unary[name][0](request)
        except (asyncio.CancelledError, GrpcAbort):
            raise
        except Exception as e:
            failure, abort = e, self.abort_for(name, e)
            raise abort from None
        finally:
            gw._in_flight -= 1
            gw.observe(f"grpc:{name}", "GRPC", self._status_label(abort, failure), time.perf_counter() - t0,
                       getattr(request, "model_name", ""))

    async def call_bytes(self, name: str, data: bytes, metadata: Mapping[str, str], remote: str) -> bytes:
        """call() on a serialized request, answering a serialized response (the lean lane's way)."""
        try:
            request = self.unary[name][1].FromString(data)
        except DecodeError as e:
            raise self.abort_for(name, e) from None
        return (await self.call(name, request, metadata, remote)).SerializeToString()

    def infer_soon(self, data: bytes, metadata: Mapping[str, str], remote: str) -> SoonInfer | None:
        """A serialized ModelInfer taken as far as the backend's queue now, with no Task: what
        call_bytes() does before its inference, in the same order (parse, in-flight bound, key,
        inputs, validation), raising the same GrpcAbort. The caller adds a done callback to
        `.future` that calls infer_answer(). None when the backend cannot answer through a
        future, or tracing is on (its span wants a task): then call_bytes() in a Task."""
        gw = self.gw
        if tracing.tracer is not None or not gw.can_infer_soon():  # decided first: nothing is checked twice
            return None
        try:
            request = pb.ModelInferRequest.FromString(data)
        except DecodeError as e:
            raise self.abort_for("ModelInfer", e) from None
        t0 = time.perf_counter()
        gw._in_flight += 1
        try:
            gw._admit()
            self.authorize("ModelInfer", metadata, remote)
            inputs, names = decode_request(request)
            future, entry = gw.infer_soon(request.model_name, request.model_version or None, inputs, names,
                                          request.id or None)
        except Exception as e:
            gw._in_flight -= 1
            abort = self.abort_for("ModelInfer", e)
            gw.observe("grpc:ModelInfer", "GRPC", self._status_label(abort, e), time.perf_counter() - t0,
                       request.model_name)
            raise abort from None
        return SoonInfer(request, names, future, entry, t0)

    def infer_answer(self, soon: SoonInfer) -> bytes:
        """The serialized ModelInferResponse of an infer_soon() call whose future is done, its
        metrics counted; raises GrpcAbort as call_bytes() would, CancelledError when the call
        was cancelled from outside (its client went away)."""
        gw = self.gw
        request = soon.request
        status = "200"
        try:
            result = gw.infer_done(soon.future, soon.entry)
            return self._response(request, soon.names, result).SerializeToString()
        except asyncio.CancelledError:
            status = "499"
            raise
        except Exception as e:
            abort = self.abort_for("ModelInfer", e)
            status = self._status_label(abort, e)
            raise abort from None
        finally:
            gw._in_flight -= 1
            gw.observe("grpc:ModelInfer", "GRPC", status, time.perf_counter() - soon.started, request.model_name)

    async def stream_item(self, request: Any, carrier: dict[str, Any] | None) -> Any:
        """One request of a ModelStreamInfer stream, answered in band: a failed one answers with
        its error_message and the stream goes on."""
        t0, status = time.perf_counter(), "200"
        self.gw._in_flight += 1
        try:
            self.gw._admit()
            return pb.ModelStreamInferResponse(infer_response=await self.model_infer(request, carrier))
        except SwarmdError as e:
            status = str(self.gw.http_status(e.code))
            return pb.ModelStreamInferResponse(error_message=f"{e.code}: {e.message}",
                                               infer_response=pb.ModelInferResponse(id=request.id))
        except OipError as e:
            status = "400"
            return pb.ModelStreamInferResponse(error_message=f"{ERR_BAD_REQUEST}: {e}",
                                               infer_response=pb.ModelInferResponse(id=request.id))
        finally:
            self.gw._in_flight -= 1
            self.gw.observe("grpc:ModelStreamInfer", "GRPC", status, time.perf_counter() - t0, request.model_name)

    def open_stream(self, metadata: Mapping[str, str], remote: str) -> dict[str, Any] | None:
        """Check a ModelStreamInfer stream's credentials (raises GrpcAbort); its trace carrier while
        tracing is on (a stream has one set of metadata: each request is a gateway.infer span in it)."""
        try:
            self.authorize("ModelStreamInfer", metadata, remote)
        except SwarmdError as e:
            raise self.abort_for("ModelStreamInfer", e) from None
        return dict(metadata) if tracing.tracer is not None else None

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
        return self._response(request, names, result)

    @staticmethod
    def _response(request: Any, names: list[str] | None, result: Any) -> Any:
        """The ModelInferResponse of a backend's InferResult, every requested output in it."""
        missing = [n for n in names or () if n not in result.outputs]
        if missing:
            raise SwarmdError(ERR_INTERNAL, f"backend returned no output {missing[0]!r}")
        return encode_response(result.model, result.version, request.id, result.outputs, names)


__all__ = ["SERVICE", "GrpcAbort", "OipService", "SoonInfer", "decode_request", "encode_response", "unimplemented"]
