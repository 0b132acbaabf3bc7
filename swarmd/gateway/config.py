"""[gateway]: the HTTP front door's settings (listen address is node.http)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class GatewayConfig:
    """[gateway]: the HTTP front door (OIP v2 / Triton REST and /api/v1), its API keys and limits.
    Its listen address is node.http."""

    auth: bool = True  # false: every route is open (a lab box only); keys are still accepted
    cors_origins: list[str] = field(default_factory=list)  # exact origins allowed; empty: no CORS
    rate_limit_rps: float = 500.0  # per key (or per client address when auth is off), sustained
    rate_limit_burst: float = 1000.0  # per key, bucket size
    # infer bodies with binary tensors; below net.max_message_size (32 MiB) so the request still fits one
    # RPC message to a worker (one over it is refused with 413 before it is sent)
    max_body_bytes: int = 30 * 1024 * 1024
    # JSON bodies and JSON headers of infer requests: parsed JSON costs ~14x its size in memory
    max_json_bytes: int = 8 * 1024 * 1024
    max_upload_bytes: int = 4 * 1024 * 1024 * 1024  # streamed model uploads
    max_in_flight: int = 2048  # concurrent requests beyond this get 503
    header_timeout: float = 10.0  # seconds for every request line + headers: from connect, or from the first byte (slowloris)
    body_timeout: float = 30.0  # seconds for a whole JSON/infer body; an upload may stall this long per chunk
    keepalive_timeout: float = 75.0  # idle keep-alive connection (no byte of a next request yet)
    max_connections: int = 4096  # open HTTP connections at once; more are closed on accept
    max_connections_per_address: int = 256  # open HTTP connections from one client address; more are closed on accept
    infer_timeout: float = 30.0  # seconds for one inference, retries included
    model_control_timeout: float = 120.0  # seconds a worker has for a repository load (fetch + warm-up) or unload
    metadata_ttl: float = 2.0  # seconds model metadata is cached (swarm backend): a push or rm shows within it
    metrics_public: bool = False  # false: /metrics needs an admin key
    # serve POST /v2/models/{model}[/versions/{v}]/infer in the lean HTTP/1.1 lane (gateway/fastlane.py):
    # the same answers for a third of the CPU; anything it does not fully understand goes to aiohttp
    fast_lane: bool = True
    access_log: bool = True  # every request (HTTP and gRPC) in the access log, written in batches (at most 1 s late)
    print_admin_key: bool = True  # print the first admin key to stdout when it is created
    local_models_dir: str | None = None  # standalone mode: serve ONNX models from this dir in-process
    discovery_interval: float = 5.0  # seconds between lookups of the stores (workers: orchestrator.dht_refresh)
    discovery_timeout: float = 3.0  # bound on one lookup pass
    usage_flush_interval: float = 5.0  # seconds between writes of per-key usage counts
    grpc: str = ""  # HOST:PORT for the OIP v2 gRPC front (inference.GRPCInferenceService); empty: off
    # what carries it: "lean" (gateway/grpc_lane.py: HTTP/2 + gRPC framing of our own, ~25 us of CPU per call
    # where grpcio's costs ~300) or "grpcio" (grpcio's asyncio server); both serve the same methods
    # (gateway/grpc_service.py); docs/grpc-wire.md
    grpc_engine: Literal["lean", "grpcio"] = "lean"
