"""The Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService`, engine-free.

One implementation of each method, served by either engine (gateway.grpc_engine): the
lean HTTP/2 lane (grpc_lane.py, the default) or grpcio's asyncio server (grpc_server.py).
Same backend, keys, permissions, rate limits, in-flight bound, timeouts and error
vocabulary as the HTTP front (swarmd/gateway/server.py); only the framing differs. Stock
`tritonclient.grpc` works against both. Messages come from swarmd/gateway/proto/oip.proto
(`make proto` regenerates oip_pb2.py, in a descriptor pool of its own so that a process
that also imports tritonclient's copy of the same package does not clash).

API keys travel in the `x-api-key` metadata (or `authorization: Bearer <key>`). Errors are
gRPC statuses (numbers, grpc_http2.GRPC_STATUS) whose details read `ERR_CODE: message`.
Methods of Triton's service that swarmd has no equivalent for (shared memory, trace and
log settings) answer UNIMPLEMENTED naming the feature.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.message import DecodeError
from loguru import logger

from swarmd import __version__
from swarmd.dtypes import CONTENTS_FIELD, TRITON_TYPES
from swarmd.errors import ERR_BAD_REQUEST, ERR_INTERNAL, ERR_TIMEOUT, GATEWAY_STATUS, SwarmdError
from swarmd.gateway.grpc_http2 import GRPC_STATUS
from swarmd.gateway.oip import OipError, decode_raw_tensor, encode_raw_tensor, numpy_dtype
from swarmd.gateway.proto import oip_pb2 as pb
from swarmd.gateway.server import tensor_meta
from swarmd.node import tracing

if TYPE_CHECKING:
    from swarmd.gateway.keys import ApiKey
    from swarmd.gateway.server import Gateway

SERVICE = "inference.GRPCInferenceService"
PUBLIC = "public"

# a SwarmdError's code -> the gRPC status it is answered with (errors.GATEWAY_STATUS); others: UNKNOWN
STATUS: dict[str, int] = {code: GRPC_STATUS[name] for code, (_, name) in GATEWAY_STATUS.items()}
INVALID_ARGUMENT = GRPC_STATUS["INVALID_ARGUMENT"]
INTERNAL = GRPC_STATUS["INTERNAL"]
UNIMPLEMENTED = GRPC_STATUS["UNIMPLEMENTED"]
CANCELLED = GRPC_STATUS["CANCELLED"]
DEADLINE = GRPC_STATUS["DEADLINE_EXCEEDED"]
# Whether a cancelled call's deadline had passed: given by an engine that enforces deadlines by
# cancelling the call's Task (grpcio), so end() counts it as DEADLINE_EXCEEDED / 504, not 499.
Expired = Callable[[], bool]

# Triton's model configuration data types (the gRPC DataType enum), by OIP datatype name.
CONFIG_TYPES: dict[str, int] = {oip: getattr(pb, name) for oip, name in TRITON_TYPES.items()}
# What each Triton method swarmd does not serve is, for the UNIMPLEMENTED answer.
NOT_BUILT = {
    "TraceSetting": "trace settings: swarmd traces with OpenTelemetry, configured per node in [tracing] "
                    "(docs/triton.md)",
    "LogSettings": "log settings: set node.log_level in the node's configuration",
}


class GrpcAbort(Exception):
    """A call's failure as gRPC answers it: a status number and its details (`ERR_CODE: message`),
    and the HTTP status the gateway's metrics and access log count it as (one label set for
    both fronts)."""

    def __init__(self, status: int, details: str, http: int = 500) -> None:
        super().__init__(details)
        self.status = status
        self.details = details
        self.http = http


def unimplemented(path: str) -> GrpcAbort:
    """The UNIMPLEMENTED answer to a method path this service does not serve, naming why."""
    method = path.rsplit("/", 1)[-1]
    if path.startswith(f"/{SERVICE}/"):
        why = NOT_BUILT.get(method, f"{method} is a Triton feature swarmd has no equivalent for "
                                    "(system and CUDA shared memory: tensors travel in the request)")
    else:
        why = f"unknown service method {path}"
    return GrpcAbort(UNIMPLEMENTED, f"swarmd gateway does not implement {method}: {why}", 501)


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


class Served:
    """One call from begin() to end(): what it is counted and logged with (OipService.end), and
    for a ModelInfer served without a Task (infer_soon) what its answer needs."""

    __slots__ = ("counted", "entry", "future", "key", "name", "names", "path", "remote", "request", "started")

    def __init__(self, name: str, remote: str) -> None:
        self.name, self.remote, self.started = name, remote, time.perf_counter()
        self.path: str | None = None  # a method the service does not serve: its path (name is then "")
        self.counted = False  # in flight (admit): end() releases it
        self.request: Any = None
        self.key: ApiKey | None = None
        self.future: asyncio.Future[Any] | None = None
        self.entry: Any = None
        self.names: list[str] | None = None


class Stream:
    """A ModelStreamInfer stream that open_stream() let in: what each of its requests is served with
    (its client, its key, its trace carrier while tracing is on: a stream has one set of
    metadata, each request is a gateway.infer span in it)."""

    __slots__ = ("carrier", "expired", "key", "remote")

    def __init__(self, remote: str, key: ApiKey | None, carrier: dict[str, Any] | None,
                 expired: Expired | None = None) -> None:
        self.remote, self.key, self.carrier, self.expired = remote, key, carrier, expired


class OipService:
    """The methods of inference.GRPCInferenceService over one Gateway, whatever carries them."""

    PERMISSIONS: dict[str, str] = {
        "ServerLive": PUBLIC, "ServerReady": PUBLIC, "ModelReady": "models:read", "ServerMetadata": "models:read",
        "ModelMetadata": "models:read", "ModelConfig": "models:read", "RepositoryIndex": "models:read",
        "ModelStatistics": "models:read", "RepositoryModelLoad": "models:write", "RepositoryModelUnload": "models:write",
        "ModelInfer": "infer", "ModelStreamInfer": "infer",
    }
    ROUTES: dict[str, str] = {name: f"grpc:{name}" for name in PERMISSIONS}  # the metrics' route label
    UNSERVED = "grpc:unimplemented"  # the route label of any other path (a bounded label set)
    PATHS: dict[str, str] = {name: f"/{SERVICE}/{name}" for name in PERMISSIONS}  # the access log's path

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
    #
    # Every call, whichever engine carries it and whether or not it runs in a Task, goes
    # begin() -> admit() -> ... -> end(): in flight, bound, key, then one end that releases
    # the in-flight count, counts the call in the metrics and writes its access-log entry,
    # exactly once whatever the outcome (answer, error, timeout, cancel).

    def begin(self, name: str, remote: str) -> Served:
        """A call of `name` from `remote` starts now (its duration counts from here)."""
        return Served(name, remote)

    def admit(self, served: Served, metadata: Mapping[str, str] | None) -> None:
        """Count the call in flight, then the in-flight bound, then the key check and rate limit of
        its method (lower-case metadata names; None: a stream's request, its key checked when the
        stream opened). Raises SwarmdError."""
        gw = self.gw
        gw._in_flight += 1  # the HTTP front's in-flight bound (middleware._admit) covers gRPC calls too
        served.counted = True
        gw._admit()
        if metadata is not None:
            served.key = self.authorize(served.name, metadata, served.remote)

    def authorize(self, name: str, metadata: Mapping[str, str], remote: str) -> ApiKey | None:
        """The key check and rate limit of `name`; raises SwarmdError."""
        permission = self.PERMISSIONS[name]
        if permission == PUBLIC:
            return None
        return self.gw.authorize(metadata.get("x-api-key"), metadata.get("authorization"), remote, permission)

    def end(self, served: Served, error: BaseException | None = None, expired: Expired | None = None
            ) -> BaseException | None:
        """The call is over: answered (error None), failed (returns the GrpcAbort to answer) or
        cancelled (client reset, connection lost, stop: returns the CancelledError to re-raise).
        A cancel is counted as the call's deadline passing (DEADLINE_EXCEEDED, 504) when the
        engine that cancelled it says so (`expired()`, grpcio's: it cancels for both reasons)."""
        if error is None:
            status, http = 0, 200
        elif isinstance(error, Exception):
            error = error if isinstance(error, GrpcAbort) else self.abort_for(served.name, error)
            status, http = error.status, error.http
        elif expired is not None and expired():
            status, http = DEADLINE, 504
        else:
            status, http = CANCELLED, 499
        gw = self.gw
        if served.counted:
            gw._in_flight -= 1
        elapsed = time.perf_counter() - served.started
        request = served.request
        unserved = served.path
        gw.observe(self.ROUTES[served.name] if unserved is None else self.UNSERVED, "GRPC", str(http), elapsed,
                   getattr(request, "model_name", ""))
        if gw.access_log is not None:
            key = served.key
            path = self.PATHS[served.name] if unserved is None else unserved
            gw.access_log.note(getattr(request, "id", None) or None, "GRPC", path, http, round(elapsed * 1000, 3),
                               key.id if key else None, served.remote, status)
        return error

    def refuse(self, name: str, remote: str, abort: GrpcAbort, since: float = 0.0, path: str | None = None
               ) -> GrpcAbort:
        """A call answered `abort` before the service saw its request (a method it does not serve:
        name "" and its `path`; a request message that never completed, started `since` seconds
        ago): counted and logged as a call all the same. Returns `abort`."""
        served = self.begin(name, remote)
        served.started -= since
        served.path = path
        self.end(served, abort)
        return abort

    def abort_for(self, name: str, e: BaseException) -> GrpcAbort:
        """What a failed call answers; 5xx-class ones go to the dashboard's error list, bugs to the log."""
        route = self.ROUTES[name]
        if isinstance(e, SwarmdError):
            http = self.gw.http_status(e.code)
            if http >= 500:
                self.gw.dashboard.note_error(route, http, e.code, e.message)
            return GrpcAbort(STATUS.get(e.code, GRPC_STATUS["UNKNOWN"]), f"{e.code}: {e.message}", http)
        if isinstance(e, OipError):
            return GrpcAbort(INVALID_ARGUMENT, f"{ERR_BAD_REQUEST}: {e}", 400)
        if isinstance(e, DecodeError):
            return GrpcAbort(INVALID_ARGUMENT, f"{ERR_BAD_REQUEST}: the {name} request is not a valid protobuf "
                                               f"message: {e}", 400)
        self.log.opt(exception=e).bind(event="grpc_bug", method=name).error("unhandled error in {}", name)
        self.gw.dashboard.note_error(route, 500, ERR_INTERNAL, f"internal error in {name}")
        return GrpcAbort(INTERNAL, f"{ERR_INTERNAL}: internal error in {name}")

    async def call(self, name: str, request: Any, metadata: Mapping[str, str], remote: str,
                   timeout: float | None = None, expired: Expired | None = None) -> Any:
        """One unary call (`name` in self.unary) in a Task: admission, keys, the method within the
        call's grpc-timeout (`timeout`, seconds) if it sent one; raises GrpcAbort. `expired`: an
        engine that enforces the deadline itself by cancelling the Task says whether it has passed."""
        served = self.begin(name, remote)
        served.request = request
        return await self._serve(served, metadata, timeout, expired)

    async def call_bytes(self, name: str, data: bytes, metadata: Mapping[str, str], remote: str,
                         timeout: float | None = None) -> bytes:
        """call() on a serialized request, answering a serialized response (the lean lane's way)."""
        served = self.begin(name, remote)
        try:
            served.request = self.unary[name][1].FromString(data)
        except DecodeError as e:
            raise self.end(served, e) from None
        return (await self._serve(served, metadata, timeout)).SerializeToString()

    async def _serve(self, served: Served, metadata: Mapping[str, str], timeout: float | None,
                     expired: Expired | None = None) -> Any:
        """call()'s work once its request is parsed; a passed grpc-timeout answers DEADLINE_EXCEEDED."""
        name, request = served.name, served.request
        try:
            self.admit(served, metadata)
            carrier = dict(metadata) if name == "ModelInfer" and tracing.tracer is not None else None
            if timeout is None:
                result = await self._method(name, request, carrier)
            else:
                deadline = asyncio.timeout(timeout)
                try:
                    async with deadline:
                        result = await self._method(name, request, carrier)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    raise GrpcAbort(DEADLINE, f"{ERR_TIMEOUT}: the call's grpc-timeout ({timeout:g}s) passed",
                                    504) from None
        except BaseException as e:
            raise self.end(served, e, expired) from None
        self.end(served)
        return result

    def _method(self, name: str, request: Any, carrier: dict[str, Any] | None) -> Any:
        """The coroutine of one unary method (ModelInfer with its trace carrier)."""
        if name == "ModelInfer":
            return self.model_infer(request, carrier)
        return self.unary[name][0](request)

    def infer_soon(self, data: bytes, metadata: Mapping[str, str], remote: str) -> Served | None:
        """A serialized ModelInfer taken as far as the backend's queue now, with no Task: what
        call_bytes() does before its inference, in the same order (parse, in-flight bound, key,
        inputs, validation), raising the same GrpcAbort. The caller adds a done callback to
        `.future` that calls infer_answer(). None when the backend cannot answer through a
        future, or tracing is on (its span wants a task): then call_bytes() in a Task."""
        gw = self.gw
        if tracing.tracer is not None or not gw.can_infer_soon():  # decided first: nothing is checked twice
            return None
        served = self.begin("ModelInfer", remote)
        try:
            served.request = request = pb.ModelInferRequest.FromString(data)
            self.admit(served, metadata)
            inputs, served.names = decode_request(request)
            served.future, served.entry = gw.infer_soon(request.model_name, request.model_version or None, inputs,
                                                        served.names, request.id or None)
        except BaseException as e:
            raise self.end(served, e) from None
        return served

    def infer_answer(self, served: Served) -> bytes:
        """The serialized ModelInferResponse of an infer_soon() call whose future is done, the
        call ended (end()); raises GrpcAbort as call_bytes() would, CancelledError when the call
        was cancelled from outside (its client went away)."""
        try:
            result = self.gw.infer_done(served.future, served.entry)  # type: ignore[arg-type]
            out = self._response(served.request, served.names, result).SerializeToString()
        except BaseException as e:
            raise self.end(served, e) from None
        self.end(served)
        return out

    def open_stream(self, metadata: Mapping[str, str], remote: str, expired: Expired | None = None) -> Stream:
        """Check a ModelStreamInfer stream's credentials (raises GrpcAbort, the refusal ended as a
        call); what its requests are served with (stream_item). `expired` as for call()."""
        served = self.begin("ModelStreamInfer", remote)
        try:
            key = self.authorize("ModelStreamInfer", metadata, remote)
        except SwarmdError as e:
            raise self.end(served, e) from None
        return Stream(remote, key, dict(metadata) if tracing.tracer is not None else None, expired)

    async def stream_item(self, stream: Stream, request: Any) -> Any:
        """One request of a ModelStreamInfer stream, counted and logged as a call of its own, answered
        in band: a failed one answers with its error_message and the stream goes on."""
        served = self.begin("ModelStreamInfer", stream.remote)
        served.request, served.key = request, stream.key
        try:
            self.admit(served, None)
            answer = pb.ModelStreamInferResponse(infer_response=await self.model_infer(request, stream.carrier))
        except (SwarmdError, OipError) as e:
            abort = self.end(served, e)
            assert isinstance(abort, GrpcAbort)
            return pb.ModelStreamInferResponse(error_message=abort.details,
                                               infer_response=pb.ModelInferResponse(id=request.id))
        except BaseException as e:
            raise self.end(served, e, stream.expired) from None
        self.end(served)
        return answer

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


__all__ = ["SERVICE", "GrpcAbort", "OipService", "Served", "Stream", "decode_request", "encode_response", "unimplemented"]
