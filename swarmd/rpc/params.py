"""The one set of checks for the params a peer sends to an RPC method.

Params arrive decoded from msgpack, so anything is possible: each check
either returns the value in the expected shape or raises ERR_BAD_REQUEST with
a sentence naming the method, the key and what was expected. Every role and
service (store, worker, things, ork) checks its params with these.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from swarmd.errors import bad_request

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
TAG_RE = re.compile(r"^[^\s]{1,64}$")
MAX_TAGS = 64


def check_keys(params: Mapping[str, Any], method: str, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise bad_request(f"{method}: unknown parameter {unknown[0]!r:.40}; expected some of {', '.join(allowed)}")


def as_params(
    params: Any, method: str, allowed: tuple[str, ...] | None = None, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """params as a dict (None: empty); with `allowed`, no other key; every `required` key present."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise bad_request(f"{method}: params must be a map, got {type(params).__name__}")
    if allowed is not None:
        check_keys(params, method, allowed)
    missing = [k for k in required if k not in params]
    if missing:
        raise bad_request(f"{method}: missing parameter {missing[0]!r}")
    return dict(params)


def str_param(params: Mapping[str, Any], key: str, method: str, max_len: int = 256) -> str | None:
    """An optional string of at most max_len characters (None when absent or null)."""
    v = params.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise bad_request(f"{method}: '{key}' must be a string of at most {max_len} characters, got {v!r:.40}")
    return v


def int_param(params: Mapping[str, Any], key: str, method: str, default: int, lo: int, hi: int) -> int:
    v = params.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad_request(f"{method}: {key} must be an integer from {lo} to {hi}, got {v!r:.40}")
    return v


def check_id(v: Any, what: str) -> str:
    if not isinstance(v, str) or not ID_RE.match(v):
        raise bad_request(
            f"{what} must be 1-128 characters of letters, digits and . _ : @ - (starting with a letter or digit),"
            f" got {v!r:.60}"
        )
    return v


def check_tags(v: Any, method: str) -> list[str]:
    if not isinstance(v, list) or len(v) > MAX_TAGS:
        raise bad_request(f"{method}: tags must be a list of at most {MAX_TAGS} strings")
    out: list[str] = []
    for t in v:
        if not isinstance(t, str) or not TAG_RE.fullmatch(t):
            raise bad_request(f"{method}: each tag must be 1-64 characters without spaces, got {t!r:.60}")
        if t not in out:
            out.append(t)
    return out


def check_object(v: Any, key: str, method: str) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise bad_request(f"{method}: {key} must be an object, got {type(v).__name__}")
    for k in v:
        if not isinstance(k, str):
            raise bad_request(f"{method}: {key} keys must be strings, got {type(k).__name__}")
    return dict(v)
