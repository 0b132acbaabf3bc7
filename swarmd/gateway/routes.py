"""The gateway's one route table: registration, permissions, OpenAPI and the route tests read it.

Each row names the HTTP method, the path (aiohttp's `{name}` placeholders), the
Gateway method that serves it, the permission a key needs ("public" for none,
"a|b" for either) and the one-line summary the OpenAPI document and /docs show.
The order is the order aiohttp tries the routes in: the inference routes come
first because nearly every request is one of them. `fast` rows are also served
by the lean HTTP/1.1 lane (swarmd/gateway/fastlane.py) when a request on them
is plain (Content-Length body, no Expect/Upgrade); everything else goes to
aiohttp.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLIC = "public"
# a key with either may read a model's metadata, config and readiness: Triton's usual flow is "read
# the metadata, then infer", so a key that may infer may also look at what it infers with
READ_OR_INFER = "models:read|infer"


@dataclass(frozen=True)
class Route:
    method: str  # GET (HEAD comes with it), POST or DELETE
    path: str
    handler: str  # the Gateway method that serves it
    permission: str  # PUBLIC, a permission, or "a|b": either
    summary: str
    fast: bool = False  # also served by the lean lane (fastlane.py)


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v2/models/{model}/infer", "oip_infer", "infer",
          "OIP v2 inference: JSON tensors, or the binary tensor extension (Inference-Header-Content-Length)",
          fast=True),
    Route("POST", "/v2/models/{model}/versions/{version}/infer", "oip_infer", "infer",
          "OIP v2 inference on one version", fast=True),
    Route("POST", "/api/v1/inference/{model}", "v1_infer", "infer",
          'Friendly inference: {"inputs": {name: nested list}} or {"input": nested list}'),
    Route("GET", "/health", "health", PUBLIC, "Gateway health and worker count"),
    Route("GET", "/v2/health/live", "live", PUBLIC, "OIP v2: server is live"),
    Route("GET", "/v2/health/ready", "ready", PUBLIC,
          "OIP v2: server is ready (a worker is available); 503 otherwise"),
    Route("GET", "/v2", "server_metadata", "models:read", "OIP v2: server metadata and extensions"),
    Route("POST", "/v2/repository/index", "repository_index", "models:read",
          'Model repository index (Triton extension); {"ready": true} lists only READY versions'),
    Route("GET", "/v2/models/stats", "model_stats", "models:read",
          "Triton statistics extension: every model version, summed over workers"),
    Route("GET", "/v2/models/{model}", "model_metadata", READ_OR_INFER, "OIP v2: model metadata (latest version)"),
    Route("GET", "/v2/models/{model}/versions/{version}", "model_metadata", READ_OR_INFER,
          "OIP v2: model metadata of one version"),
    Route("GET", "/v2/models/{model}/config", "model_config", READ_OR_INFER, "Triton-style model configuration"),
    Route("GET", "/v2/models/{model}/versions/{version}/config", "model_config", READ_OR_INFER,
          "Triton-style configuration of one version"),
    Route("GET", "/v2/models/{model}/ready", "model_ready", READ_OR_INFER,
          "OIP v2: model ready; 503 when no worker serves it"),
    Route("GET", "/v2/models/{model}/versions/{version}/ready", "model_ready", READ_OR_INFER,
          "OIP v2: model version ready"),
    Route("GET", "/v2/models/{model}/stats", "model_stats", "models:read",
          "Triton statistics extension: one model's versions"),
    Route("GET", "/v2/models/{model}/versions/{version}/stats", "model_stats", "models:read",
          "Triton statistics extension: one version"),
    Route("POST", "/v2/repository/models/{model}/load", "model_control", "models:write",
          "Triton model control: load a model on the workers (from the stores)"),
    Route("POST", "/v2/repository/models/{model}/unload", "model_control", "models:write",
          "Triton model control: unload a model from the workers"),
    *(Route(m, path, "triton_unsupported", PUBLIC, f"Triton {what}: 501 naming the feature (not supported)")
      for path, what in (("/v2/trace/setting", "trace settings"), ("/v2/models/{model}/trace/setting",
                         "trace settings of a model"), ("/v2/logging", "log settings"))
      for m in ("GET", "POST")),
    *(Route(m, f"/v2/{kind}{path}", "triton_unsupported", PUBLIC, f"Triton {kind}: 501 (not supported)")
      for kind in ("systemsharedmemory", "cudasharedmemory")
      for m, path in (("GET", "/status"), ("GET", "/region/{region}/status"), ("POST", "/unregister"),
                      ("POST", "/region/{region}/register"), ("POST", "/region/{region}/unregister"))),
    Route("GET", "/api/v1/models", "v1_models", "models:read", "List models"),
    Route("GET", "/api/v1/models/{model}", "v1_model", "models:read", "One model's metadata (?version=)"),
    Route("POST", "/api/v1/models", "v1_upload", "models:write",
          'Upload a model: JSON {"name", "version"?, "data": base64}, a raw body with ?name=&version=&sha256=, '
          "or multipart/form-data (curl -F model=@FILE -F name=NAME)"),
    Route("GET", "/api/v1/status", "v1_status", "admin", "Gateway, node and backend status"),
    Route("GET", "/api/v1/keys", "keys_list", "admin", "List API keys (masked) with usage"),
    Route("POST", "/api/v1/keys", "keys_create", "admin",
          'Create an API key: {"name", "permissions": [...]}; the key is shown once'),
    Route("GET", "/api/v1/keys/{id}", "keys_get", "admin", "One API key (masked) with usage"),
    Route("DELETE", "/api/v1/keys/{id}", "keys_revoke", "admin", "Revoke an API key"),
    Route("GET", "/metrics", "metrics_route", "admin", "Prometheus metrics (public when gateway.metrics_public)"),
    Route("GET", "/openapi.json", "openapi", PUBLIC, "This document"),
    Route("GET", "/docs", "docs", PUBLIC, "Human-readable API reference"),
    Route("GET", "/dashboard", "dashboard_page", PUBLIC,
          "Operator dashboard page (static; asks for a key, reads the feed below)"),
    Route("GET", "/dashboard/{asset}", "dashboard_page", PUBLIC, "The dashboard's own script and style sheet"),
    Route("GET", "/api/v1/dashboard/feed", "dashboard_feed", "models:read",
          "Server-Sent Events: a snapshot of nodes, workers, models and traffic every second"),
)


def permission_of(route: Route, metrics_public: bool = False) -> str:
    """The permission a route needs on this gateway (gateway.metrics_public opens /metrics)."""
    if route.path == "/metrics" and metrics_public:
        return PUBLIC
    return route.permission
