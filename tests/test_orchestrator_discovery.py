"""Worker ads from peers (DHT records, registerWorker params): precise errors, never a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.errors import ERR_BAD_REQUEST, ERR_OVERLOADED, SwarmdError
from swarmd.orchestrator.balancer import Balancer
from swarmd.orchestrator.config import OrchestratorConfig
from swarmd.orchestrator.discovery import ad_from_record, parse_register
from tests.conftest import node_context

PK = bytes(range(32))


def test_record_with_contract_payload_becomes_an_ad() -> None:
    ad = ad_from_record(
        PK,
        [["127.0.0.1", 4000]],
        {
            "state": "ONLINE",
            "models": ["mlp", {"name": "cnn", "version": "2"}],
            "load": {"queue": 2, "in_flight": 3, "ewma_ms": 1.5, "rps": 10, "junk": "x"},
            "capabilities": ["gpu"],
        },
    )
    assert ad.public_key == PK.hex()
    assert ad.models == ["mlp", "cnn"] and ad.capabilities == ["gpu"]
    assert ad.addresses == [("127.0.0.1", 4000)]
    assert ad.load == {"queue": 2, "in_flight": 3, "ewma_ms": 1.5, "rps": 10}


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ("nope", "payload must be a map"),
        ({"state": "SLEEPING", "models": []}, "state must be one of"),
        ({"models": "mlp"}, "models must be a list"),
        ({"models": [""]}, "models[0] must be a non-empty string"),
        ({"models": ["m"] * 1000}, "at most 256"),
    ],
)
def test_bad_records_are_refused_with_the_reason(payload: Any, needle: str) -> None:
    with pytest.raises(SwarmdError) as ei:
        ad_from_record(PK, [], payload)
    assert ei.value.code == ERR_BAD_REQUEST and needle in ei.value.message


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"models": ["m"]}, "public_key must be a 32-byte"),
        ({"public_key": "zz" * 32, "models": ["m"]}, "public_key must be"),
        ({"public_key": PK.hex(), "models": ["m"], "host": "h"}, "host and port go together"),
        ({"public_key": PK.hex(), "models": ["m"], "host": "h", "port": 70000}, "port from 1 to 65535"),
        ({"public_key": PK.hex(), "models": ["m"], "weight": 0}, "weight must be a number above 0"),
        ({"public_key": PK.hex(), "models": ["m"], "ttl": 0}, "ttl must be"),
        ([1, 2], "params must be a map"),
    ],
)
def test_bad_registrations_name_the_field(params: Any, needle: str) -> None:
    with pytest.raises(SwarmdError) as ei:
        parse_register(params)
    assert ei.value.code == ERR_BAD_REQUEST and needle in ei.value.message


def test_registration_defaults() -> None:
    ad, ttl = parse_register({"public_key": PK.hex(), "models": ["mlp"], "host": "127.0.0.1", "port": 9})
    assert (ad.state, ad.weight, ad.addresses, ad.capabilities, ttl) == (
        "ONLINE",
        1.0,
        [("127.0.0.1", 9)],
        [],
        None,
    )


def test_registry_cap_refuses_new_workers_but_renews_known_ones() -> None:
    b = Balancer(OrchestratorConfig(max_workers=2))
    for i in range(2):
        ad, _ = parse_register({"public_key": bytes([i]) * 32, "models": ["m"], "host": "h", "port": 1})
        b.admit(ad, source="rpc")
    ad, _ = parse_register({"public_key": bytes([0]) * 32, "models": ["m", "n"], "host": "h", "port": 1})
    assert b.admit(ad, source="rpc").models == {"m", "n"}
    ad, _ = parse_register({"public_key": bytes([9]) * 32, "models": ["m"], "host": "h", "port": 1})
    with pytest.raises(SwarmdError) as ei:
        b.admit(ad, source="rpc")
    assert ei.value.code == ERR_OVERLOADED


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from(["ONLINE", "JOINING", "DRAINING", "bad"]) | msgpack_values,
        "models": st.lists(st.text(max_size=8) | msgpack_values, max_size=4) | msgpack_values,
        "capabilities": msgpack_values,
        "load": st.dictionaries(st.sampled_from(["queue", "in_flight", "ewma_ms"]), msgpack_values)
        | msgpack_values,
        "weight": msgpack_values,
    },
)


@settings(max_examples=100, deadline=None)
@given(
    key=st.binary(min_size=0, max_size=40) | msgpack_values,
    addresses=msgpack_values,
    payload=payloads | msgpack_values,
)
def test_any_record_is_an_ad_or_a_bad_request(key: Any, addresses: Any, payload: Any) -> None:
    b = Balancer(OrchestratorConfig())
    try:
        ad = ad_from_record(key, addresses, payload)
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST
        return
    lease = b.admit(ad, source="dht", ttl=10)
    assert lease.public_key == ad.public_key
    for name in ad.models:
        assert lease in b.registry.matching(name)
    if ad.models and ad.state == "ONLINE":
        assert b.choose(ad.models[0]).public_key == ad.public_key


@settings(max_examples=100, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(
            ["public_key", "models", "capabilities", "host", "port", "weight", "state", "ttl", "load"]
        ),
        msgpack_values,
    )
    | msgpack_values
)
def test_any_register_params_are_an_ad_or_a_bad_request(params: Any) -> None:
    try:
        parse_register(params)
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from(
        [
            "register_worker",
            "unregister_worker",
            "find_available_worker",
            "route_inference_request",
            "health_check",
        ]
    ),
    params=st.dictionaries(
        st.sampled_from(["public_key", "model", "capability", "exclude", "models", "host", "port", "inputs"]),
        msgpack_values,
    )
    | msgpack_values,
)
async def test_role_methods_answer_any_params_with_a_stable_error(method: str, params: Any) -> None:
    from swarmd.errors import ALL_CODES, ERR_INTERNAL
    from swarmd.roles.orchestrator import OrchestratorRole

    ctx = node_context(Path("."), "orchestrator")
    role = OrchestratorRole(ctx)
    try:
        await getattr(role, method)(None, params)
    except SwarmdError as e:
        assert e.code in ALL_CODES and e.code != ERR_INTERNAL
