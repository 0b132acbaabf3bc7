"""OpenTelemetry tracing of one request across the swarm: off unless [tracing] enabled.

When off, the module attribute `tracer` is None and nothing here is imported
beyond this file: every hook on a hot path (the gateway's infer, RpcPeer.call,
the worker's queue) is one check of `tracing.tracer`. When on, the trace context travels in
a caller's W3C `traceparent`/`tracestate` into the gateway and between peers in the
optional `meta` element of an RPC request (docs/protocol.md §5), so any W3C
propagator reads it; how to turn it on and the spans of one inference:
docs/operations.md, "Tracing". The worker's phases are recorded after the fact from
the timings its statistics already take, with their real start and end times.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from swarmd.errors import ConfigError

tracer: Any = None  # an opentelemetry Tracer while tracing is on; None is the whole "off" path
_provider: Any = None
_propagator: Any = None

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


@dataclass
class TracingConfig:
    """[tracing]: OpenTelemetry spans of each request across gateway, router and worker
    (optional extra swarmd[otel]). Off by default; when off it costs one check per request."""

    enabled: bool = False  # true: record spans and export them (needs pip install 'swarmd[otel]')
    exporter: Literal["otlp", "file"] = "otlp"  # otlp: to a collector; file: JSON lines to tracing.file
    # OTLP endpoint, e.g. http://collector:4318 (http/protobuf) or http://collector:4317 (grpc);
    # empty: the SDK's default or OTEL_EXPORTER_OTLP_ENDPOINT
    endpoint: str = ""
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"  # OTLP transport
    file: str = ""  # exporter = "file": path of the JSON-lines file (one span per line, appended)
    service_name: str = "swarmd"  # resource service.name; the node's public key is service.instance.id
    sample_ratio: float = 1.0  # share of new traces recorded (0..1); a traced caller's choice is kept

    def validate(self) -> None:
        ConfigError.refuse_if(self, "tracing", "sample_ratio", lambda v: not 0.0 <= v <= 1.0, "be between 0 and 1")
        if self.enabled and self.exporter == "file" and not self.file:
            raise ConfigError("tracing.exporter = \"file\" needs tracing.file (a path)")


def _exporter(config: TracingConfig) -> Any:
    if config.exporter == "file":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        path = Path(config.file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "a", buffering=1)  # noqa: SIM115 - the exporter owns it until shutdown
        return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + os.linesep)
    kwargs = {"endpoint": config.endpoint} if config.endpoint else {}
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
        if config.endpoint and not config.endpoint.rstrip("/").endswith("/v1/traces"):
            kwargs["endpoint"] = config.endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(**kwargs)


def start(config: TracingConfig, *, instance: str = "", exporter: Any = None) -> None:
    """Turn tracing on for this process (a no-op when config.enabled is false and no exporter
    is given). `exporter` replaces the configured one (an SDK SpanExporter, e.g. the
    in-memory one of a test). Raises ConfigError when the SDK is not installed."""
    global tracer, _provider, _propagator
    if not config.enabled and exporter is None:
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as e:
        raise ConfigError(
            f"tracing.enabled needs the OpenTelemetry SDK ({e.name} is missing): pip install 'swarmd[otel]'"
        ) from None
    stop()
    attrs = {"service.name": config.service_name}
    if instance:
        attrs["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attrs),
                              sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    _provider = provider
    _propagator = TraceContextTextMapPropagator()
    tracer = provider.get_tracer("swarmd")


def stop() -> None:
    """Export what is buffered and turn tracing off (the daemon's stop)."""
    global tracer, _provider, _propagator
    provider, _provider, tracer, _propagator = _provider, None, None, None
    if provider is not None:
        provider.shutdown()


def extract(carrier: Mapping[str, Any] | None) -> Any:
    """The parent context a `traceparent` in carrier (headers, gRPC metadata, an RPC meta map)
    names; None when it names none or a malformed one (a peer's junk starts no trace)."""
    if not carrier or _propagator is None:
        return None
    tp = carrier.get(TRACEPARENT)
    if not isinstance(tp, str) or len(tp) > 256:
        return None
    src = {TRACEPARENT: tp}
    ts = carrier.get(TRACESTATE)
    if isinstance(ts, str) and len(ts) <= 1024:
        src[TRACESTATE] = ts
    from opentelemetry import trace

    ctx = _propagator.extract(src)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def meta() -> dict[str, str] | None:
    """The current span's context as an RPC request's meta map, or None outside a recorded span."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    out: dict[str, str] = {}
    _propagator.inject(out)
    return out or None


@contextlib.contextmanager
def span(name: str, *, parent: Any = None, kind: str = "INTERNAL",
         attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span, current for the block; an exception escaping it marks the span as an error."""
    from opentelemetry import trace

    with tracer.start_as_current_span(name, context=parent, kind=getattr(trace.SpanKind, kind),
                                      attributes=attributes) as s:
        yield s


async def serve(method: str, parent: Any, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an RPC handler (a request that arrived with a trace context) inside a server span."""
    with span(f"rpc {method}", parent=parent, kind="SERVER",
              attributes={"rpc.system": "swarmd", "rpc.method": method}):
        return await coro


def worker_phases(enqueued: float, started: float, ended: float, times: tuple[float, float, float] | None,
                  batch_size: int, rows: int) -> None:
    """The worker's queue, batch and run spans of one request, under the current span, from
    the time.monotonic() timings the worker took while it ran: what statistics record, as spans."""
    if tracer is None:
        return
    off = time.time_ns() - int(time.monotonic() * 1e9)

    def ns(t: float) -> int:
        return off + int(t * 1e9)

    tracer.start_span("worker.queue", start_time=ns(enqueued)).end(end_time=ns(started))
    from opentelemetry import trace

    batch = tracer.start_span("worker.batch", start_time=ns(started),
                              attributes={"swarmd.batch.requests": batch_size, "swarmd.batch.rows": rows})
    if times is not None:
        ctx = trace.set_span_in_context(batch)
        run_start = started + times[0]
        run = tracer.start_span("worker.run", context=ctx, start_time=ns(run_start))
        run.end(end_time=ns(run_start + times[1]))
        # the run is timed in its thread, the batch's ends on the loop: the batch ends no
        # earlier than its run whatever the order the two clocks were read in
        ended = max(ended, run_start + sum(times))
    batch.end(end_time=ns(ended))
