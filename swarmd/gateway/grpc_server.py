"""The grpcio engine of the gateway's gRPC front (gateway.grpc_engine = "grpcio").

grpcio's asyncio server carrying grpc_service.OipService: this module only adapts
grpcio's handlers and context (metadata, peer, abort) to the service; every method,
permission and error mapping lives there, shared with the lean lane (grpc_lane.py, the
default engine). grpcio's per-call machinery costs ~310 µs of gateway CPU (the "grpc
floor" row of bench/gateway_grpc.py); it stays for comparison and as a fallback should
a client need an HTTP/2 corner the lean lane does not speak (docs/grpc-wire.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from swarmd.errors import SwarmdError
from swarmd.gateway.grpc_service import (
    SERVICE,
    Expired,
    GrpcAbort,
    OipService,
    decode_request,
    encode_response,
    unimplemented,
)
from swarmd.gateway.proto import oip_pb2 as pb
from swarmd.node.address import format_hostport, parse_hostport

if TYPE_CHECKING:
    from swarmd.gateway.server import Gateway

CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _remote(context: grpc.aio.ServicerContext) -> str:
    """The client's address as the other fronts name it ("ipv4:127.0.0.1:5000" -> "127.0.0.1",
    "ipv6:[::1]:5000" -> "::1"): the rate limit's bucket with auth off, the access log's peer."""
    peer = context.peer() or "?"
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        try:
            return parse_hostport(address, what="grpc peer")[0]
        except SwarmdError:
            pass
    return peer


def _expired(context: grpc.aio.ServicerContext) -> Expired:
    """Whether grpcio cancelled the call because its deadline passed rather than because the client
    went away: it cancels the handler's Task for both, and only the time left tells them apart
    (grpcio reports 0 once the deadline is reached, None for a call without one). A client that
    cancels at its own deadline a moment before grpcio's timer fires still reads as a cancel."""

    def expired() -> bool:
        left = context.time_remaining()
        return left is not None and left <= 0

    return expired


class GrpcFront:
    """One grpc.aio server in front of a Gateway's backend, sharing its keys and limits."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.service = OipService(gateway)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        limit = self.gw.config.max_body_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ])
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name, (_, req_type) in self.service.unary.items():
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._unary(name), request_deserializer=req_type.FromString,
                response_serializer=lambda m: m.SerializeToString())
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())
        self.server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(SERVICE, handlers), _Unimplemented(self.service)))
        bound = self.server.add_insecure_port(format_hostport(host, port))
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

    def _unary(self, name: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await self.service.call(name, request, _metadata(context), _remote(context),
                                               expired=_expired(context))
            except GrpcAbort as e:
                await context.abort(CODES[e.status], e.details)

        return call

    async def model_stream_infer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[Any]:
        try:
            stream = self.service.open_stream(_metadata(context), _remote(context), _expired(context))
            async for request in requests:
                yield await self.service.stream_item(stream, request)
        except GrpcAbort as e:  # refused, or a bug in a request (logged): the stream ends with its status
            await context.abort(CODES[e.status], e.details)


class _Unimplemented(grpc.GenericRpcHandler):
    """Any other method of the service (or of another service): UNIMPLEMENTED with a reason."""

    def __init__(self, oip: OipService) -> None:
        self.oip = oip

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            abort = self.oip.refuse("", _remote(context), unimplemented(path), path=path)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, abort.details)
            return b""

        return grpc.unary_unary_rpc_method_handler(refuse)


__all__ = ["GrpcFront", "decode_request", "encode_response"]
