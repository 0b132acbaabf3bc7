"""Turning what peers tell us (DHT worker records, registerWorker params) into lease fields.

Both inputs come from other machines, so both are checked field by field with
bounded sizes and precise messages; a bad record is dropped with a reason, a
bad registerWorker call gets ERR_BAD_REQUEST naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from swarmd.node.address import parse_address
from swarmd.node.identity import parse_public_key
from swarmd.orchestrator.registry import ONLINE, STATES
from swarmd.rpc.params import as_params, bad_request

MAX_NAMES = 256  # models or capabilities per worker
MAX_NAME_LEN = 200
MAX_ADDRESSES = 16
MAX_LOAD = 1e9  # a load figure above this is nonsense from a peer and is dropped
LOAD_KEYS = ("queue", "queue_depth", "in_flight", "max_concurrent", "ewma_ms", "rps")


@dataclass
class WorkerAd:
    """A worker's self-description, validated."""

    public_key: str  # hex
    models: list[str]
    capabilities: list[str] = field(default_factory=list)
    addresses: list[tuple[str, int]] = field(default_factory=list)
    weight: float = 1.0
    state: str = ONLINE
    load: dict[str, float] | None = None


def parse_names(value: Any, what: str) -> list[str]:
    """A list of model or capability names. Model entries may also be {"name": ...} objects."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise bad_request(f"{what} must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_NAMES:
        raise bad_request(f"{what} lists {len(value)} entries; at most {MAX_NAMES} are accepted")
    out: list[str] = []
    for i, item in enumerate(value):
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise bad_request(
                f"{what}[{i}] must be a non-empty string of at most {MAX_NAME_LEN} characters, got {item!r:.80}"
            )
        out.append(name)
    return out


def parse_load(value: Any) -> dict[str, float] | None:
    """Keep only the numeric load fields we know; anything else in a peer's payload is ignored."""
    if not isinstance(value, dict):
        return None
    out: dict[str, float] = {}
    for k in LOAD_KEYS:
        v = value.get(k)
        if (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and 0 <= v <= MAX_LOAD
        ):
            out[k] = v
    return out


def parse_register(params: Any) -> tuple[WorkerAd, float | None]:
    """registerWorker params -> (ad, ttl or None)."""
    params = as_params(params, "registerWorker")
    ad = WorkerAd(
        public_key=parse_public_key(params.get("public_key"), "public_key").hex(),
        models=parse_names(params.get("models"), "models"),
        capabilities=parse_names(params.get("capabilities"), "capabilities"),
    )
    host, port = params.get("host"), params.get("port")
    if (host is None) != (port is None):
        raise bad_request("host and port go together: give both or neither")
    if host is not None:
        ad.addresses = [parse_address([host, port], "host/port")]
    weight = params.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not (0 < weight <= 1e6):
        raise bad_request(f"weight must be a number above 0 and at most 1e6, got {weight!r:.40}")
    ad.weight = float(weight)
    state = params.get("state", ONLINE)
    if state not in STATES:
        raise bad_request(f"state must be one of {', '.join(sorted(STATES))}, got {state!r:.40}")
    ad.state = state
    ad.load = parse_load(params.get("load"))
    ttl = params.get("ttl")
    if ttl is not None and (
        not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not (1 <= ttl <= 86400)
    ):
        raise bad_request(f"ttl must be a number of seconds from 1 to 86400, got {ttl!r:.40}")
    return ad, (None if ttl is None else float(ttl))


def ad_from_record(public_key: Any, addresses: Any, payload: Any) -> WorkerAd:
    """A WORKERS / worker_model_topic DHT record -> WorkerAd; raises ERR_BAD_REQUEST with the reason.

    Payload per the worker contract: {"state", "models": [...], "load": {...}},
    optionally "capabilities". A record never sets its own routing weight: a
    "weight" in it is ignored (weights are the operator's, given by registerWorker
    from an operator key).
    """
    if not isinstance(payload, dict):
        raise bad_request(f"worker record payload must be a map, got {type(payload).__name__}")
    ad = WorkerAd(
        public_key=parse_public_key(public_key, "public_key").hex(),
        models=parse_names(payload.get("models"), "models"),
        capabilities=parse_names(payload.get("capabilities"), "capabilities"),
    )
    state = payload.get("state", ONLINE)
    if state not in STATES:
        raise bad_request(f"state must be one of {', '.join(sorted(STATES))}, got {state!r:.40}")
    ad.state = state
    if addresses is not None:
        if not isinstance(addresses, (list, tuple)):
            raise bad_request("record addresses must be a list of [host, port]")
        ad.addresses = [
            parse_address(a, f"addresses[{i}]") for i, a in enumerate(list(addresses)[:MAX_ADDRESSES])
        ]
    ad.load = parse_load(payload.get("load"))
    return ad


# -- liveness read from records -------------------------------------------------

EJECTED_PREFIX = 16  # hex digits of a worker's key in an orchestrator's "ejected" list
MAX_EJECTED_LISTED = 16  # ... and how many of them (a record payload is at most 2 KiB, grants included)
TIME_SEQ_FLOOR = 10**12  # a seq at or above this is the record's signing time in ms (swarm.Swarm._next_seq)
LIVE_LIFETIME_MAX = 120.0  # a record signed to live at most this long says "up now" (SwarmConfig.live_*)


def signed_age(seq: Any, now: float) -> float | None:
    """Seconds since the peer signed a record, read from its time-based seq; None when the
    seq is not a time (another implementation). A clock ahead of ours reads as 0."""
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < TIME_SEQ_FLOOR:
        return None
    return max(0.0, now - seq / 1000.0)


def missed_refreshes(record: Any, now: float, after: float) -> bool:
    """Whether a live record (signed to live at most LIVE_LIFETIME_MAX) was last signed more
    than `after` seconds ago: its node stopped refreshing it, and is most likely dead though
    the record has not expired yet. The lifetime is read from the record's own two times (one
    clock: the signer's); only the age compares its clock with ours."""
    seq, expiry = getattr(record, "seq", None), getattr(record, "expiry", None)
    age = signed_age(seq, now)
    if age is None or not isinstance(expiry, (int, float)) or isinstance(expiry, bool):
        return False
    return expiry - seq / 1000.0 <= LIVE_LIFETIME_MAX and age > after


def ejection_verdicts(records: Any) -> dict[str, list[str]]:
    """Worker key prefix -> the orchestrators (key prefixes) whose ORCHESTRATORS record lists
    it as ejected. Junk entries in a peer's payload are skipped."""
    out: dict[str, list[str]] = {}
    for rec in records:
        payload = getattr(rec, "payload", None)
        listed = payload.get("ejected") if isinstance(payload, dict) else None
        key = getattr(rec, "public_key", None)
        if not isinstance(listed, list) or not isinstance(key, (bytes, bytearray)):
            continue
        for prefix in listed[:MAX_EJECTED_LISTED]:
            if isinstance(prefix, str) and len(prefix) >= EJECTED_PREFIX:
                who = bytes(key).hex()[:EJECTED_PREFIX]
                voters = out.setdefault(prefix[:EJECTED_PREFIX].lower(), [])
                if who not in voters:
                    voters.append(who)
    return out
