"""The gateway's OpenAPI 3.1 document and a docs page rendered from it.

Both are made from the route table (swarmd/gateway/routes.py). The page is
plain HTML with no script from elsewhere: a gateway may run on a box with no
way out, and a docs page that loads a CDN would be blank there.
"""

from __future__ import annotations

import html
from typing import Any

from swarmd.gateway.routes import PUBLIC, ROUTES

ERROR = {"$ref": "#/components/schemas/Error"}
KEY = [{"apiKey": []}, {"bearer": []}]


def openapi_document(version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in ROUTES:
        method, path, perm = route.method.lower(), route.path, route.permission
        op: dict[str, Any] = {
            "summary": route.summary,
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "malformed request", "content": {"application/json": {"schema": ERROR}}},
                "404": {"description": "unknown model, version or key", "content": {"application/json": {"schema": ERROR}}},
            },
        }
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        if perm == PUBLIC:
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
