"""The gateway's OpenAPI 3.1 document and a docs page rendered from it.

The page is plain HTML with no script from elsewhere: a gateway may run on a
box with no way out, and a docs page that loads a CDN would be blank there.
"""

from __future__ import annotations

import html
from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}
KEY = [{"apiKey": []}, {"bearer": []}]

# (method, path, permission or "public", summary)
ROUTES: list[tuple[str, str, str, str]] = [
    ("get", "/health", "public", "Gateway health and worker count"),
    ("get", "/v2/health/live", "public", "OIP v2: server is live"),
    ("get", "/v2/health/ready", "public", "OIP v2: server is ready (a worker is available); 503 otherwise"),
    ("get", "/v2", "models:read", "OIP v2: server metadata and extensions"),
    ("post", "/v2/repository/index", "models:read", "Model repository index (Triton extension)"),
    ("get", "/v2/models/{model}", "models:read", "OIP v2: model metadata (latest version)"),
    ("get", "/v2/models/{model}/versions/{version}", "models:read", "OIP v2: model metadata of one version"),
    ("get", "/v2/models/{model}/config", "models:read", "Triton-style model configuration"),
    ("get", "/v2/models/{model}/ready", "models:read", "OIP v2: model ready; 503 when no worker serves it"),
    ("get", "/v2/models/stats", "models:read", "Triton statistics extension: every model version, summed over workers"),
    ("get", "/v2/models/{model}/stats", "models:read", "Triton statistics extension: one model's versions"),
    ("get", "/v2/models/{model}/versions/{version}/stats", "models:read", "Triton statistics extension: one version"),
    ("get", "/v2/models/{model}/versions/{version}/ready", "models:read", "OIP v2: model version ready"),
    ("post", "/v2/models/{model}/infer", "infer",
     "OIP v2 inference: JSON tensors, or the binary tensor extension (Inference-Header-Content-Length)"),
    ("post", "/v2/models/{model}/versions/{version}/infer", "infer", "OIP v2 inference on one version"),
    ("post", "/api/v1/inference/{model}", "infer",
     'Friendly inference: {"inputs": {name: nested list}} or {"input": nested list}'),
    ("get", "/api/v1/models", "models:read", "List models"),
    ("get", "/api/v1/models/{model}", "models:read", "One model's metadata (?version=)"),
    ("post", "/api/v1/models", "models:write",
     'Upload a model: JSON {"name", "version"?, "data": base64} or a raw body with ?name=&version=&sha256='),
    ("get", "/api/v1/status", "admin", "Gateway, node and backend status"),
    ("get", "/api/v1/keys", "admin", "List API keys (masked) with usage"),
    ("post", "/api/v1/keys", "admin", 'Create an API key: {"name", "permissions": [...]}; the key is shown once'),
    ("get", "/api/v1/keys/{id}", "admin", "One API key (masked) with usage"),
    ("delete", "/api/v1/keys/{id}", "admin", "Revoke an API key"),
    ("get", "/metrics", "admin", "Prometheus metrics (public when gateway.metrics_public)"),
    ("get", "/openapi.json", "public", "This document"),
    ("get", "/docs", "public", "Human-readable API reference"),
    ("get", "/dashboard", "public", "Operator dashboard page (static; asks for a key, reads the feed below)"),
    ("get", "/dashboard/{asset}", "public", "The dashboard's own script and style sheet"),
    ("get", "/api/v1/dashboard/feed", "models:read",
     "Server-Sent Events: a snapshot of nodes, workers, models and traffic every second"),
]


def openapi_document(version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, perm, summary in ROUTES:
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "malformed request", "content": {"application/json": {"schema": ERROR}}},
                "404": {"description": "unknown model, version or key", "content": {"application/json": {"schema": ERROR}}},
            },
        }
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        if perm == "public":
            op["security"] = []
        else:
            op["security"] = KEY
            op["x-permission"] = perm
            op["responses"]["401"] = {"description": "missing or unknown API key"}
            op["responses"]["403"] = {"description": f"API key lacks permission {perm}"}
            op["responses"]["429"] = {"description": "rate limited; see Retry-After"}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "swarmd gateway", "version": version,
                 "description": "Open Inference Protocol v2 and the swarmd /api/v1 routes."},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "code": {"type": "string"},
                                   "request_id": {"type": "string"}},
                }
            },
        },
    }


def docs_page(doc: dict[str, Any]) -> str:
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op.get('x-permission', 'public'))}</td><td>{html.escape(op['summary'])}</td></tr>"
            )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>swarmd gateway API</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:left}"
        "tr:nth-child(even){background:#f4f4f4}</style></head><body>"
        f"<h1>swarmd gateway API {html.escape(doc['info']['version'])}</h1>"
        "<p>Send an API key as <code>x-api-key: KEY</code> or <code>Authorization: Bearer KEY</code>. "
        "Errors are JSON: <code>{\"error\": \"...\", \"code\": \"ERR_...\"}</code>. "
        "Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table><tr><th>method</th><th>path</th><th>permission</th><th>what</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
