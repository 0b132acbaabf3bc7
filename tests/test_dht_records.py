"""Signed topic records, the record store's caps and the write tokens (sans-IO)."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.dht.records import (
    RecordError,
    RecordStore,
    TokenIssuer,
    Unannounce,
    decode_record,
    make_record,
    topic_from_name,
)
from swarmd.errors import ERR_BAD_REQUEST, ERR_CONFLICT, ERR_FORBIDDEN, ERR_OVERLOADED, ERR_TOO_LARGE
from swarmd.node.identity import Identity

NOW = 1_800_000_000.0
ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
TOPIC = topic_from_name("models")


def _rec(ident: Identity = ALICE, seq: int = 1, ttl: float = 60.0, now: float = NOW, **payload: object):  # noqa: ANN202
    return make_record(ident, TOPIC, [("127.0.0.1", 4000), ("::1", 4001)], dict(payload), seq, ttl, now)


def test_topic_is_32_bytes_and_the_secret_changes_it() -> None:
    assert len(topic_from_name("x")) == 32
    assert topic_from_name("x") == topic_from_name(b"x")
    assert topic_from_name("x", b"secret") != topic_from_name("x")
    assert topic_from_name("x", b"secret") != topic_from_name("x", b"other")


def test_record_round_trips_through_the_wire() -> None:
    rec = _rec(load=0.5, state="ONLINE")
    wire = msgpack.unpackb(msgpack.packb(rec.to_wire(), use_bin_type=True), raw=False)
    got = decode_record(wire, NOW)
    assert got == rec
    assert got.payload == {"load": 0.5, "state": "ONLINE"}
    assert got.addresses == (("127.0.0.1", 4000), ("::1", 4001))


@pytest.mark.parametrize(
    "field,value",
    [("a", [["127.0.0.1", 4999]]), ("s", 2), ("e", int(NOW * 1000) + 5000), ("t", topic_from_name("other"))],
)
def test_altered_record_fails_its_signature(field: str, value: object) -> None:
    wire = _rec().to_wire()
    wire[field] = value
    with pytest.raises(RecordError) as e:
        decode_record(wire, NOW)
    assert e.value.code == ERR_FORBIDDEN


def test_record_signed_by_another_key_is_forged() -> None:
    wire = _rec().to_wire()
    wire["k"] = MALLORY.public_key
    with pytest.raises(RecordError) as e:
        decode_record(wire, NOW)
    assert e.value.code == ERR_FORBIDDEN


def test_expired_and_far_future_records_are_refused() -> None:
    with pytest.raises(RecordError, match="expired") as e:
        decode_record(_rec(ttl=10).to_wire(), NOW + 11)
    assert e.value.code == ERR_BAD_REQUEST
    with pytest.raises(RecordError, match="future"):
        decode_record(_rec(ttl=24 * 3600).to_wire(), NOW, max_ttl=1800)


def test_oversized_payload_and_too_many_addresses_are_refused() -> None:
    with pytest.raises(RecordError) as e:
        make_record(ALICE, TOPIC, [], {"blob": b"x" * 4096}, 1, 60, NOW)
    assert e.value.code == ERR_TOO_LARGE
    big = _rec().to_wire()
    big["p"] = msgpack.packb({"blob": b"x" * 4096})
    with pytest.raises(RecordError) as e:
        decode_record(big, NOW)
    assert e.value.code == ERR_TOO_LARGE
    many = _rec().to_wire()
    many["a"] = [["127.0.0.1", p] for p in range(1, 50)]
    with pytest.raises(RecordError) as e:
        decode_record(many, NOW)
    assert e.value.code == ERR_TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["t", "k", "a", "p", "s", "e", "g", "x"]),
        st.one_of(
            st.binary(max_size=80),
            st.integers(),
            st.text(max_size=20),
            st.lists(st.integers(), max_size=3),
            st.none(),
        ),
    )
)
def test_decode_record_raises_only_record_error(obj: dict) -> None:
    try:
        decode_record(obj, NOW)
    except RecordError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_record_with_garbage_payload_bytes(payload: bytes) -> None:
    wire = _rec(load=1).to_wire()
    if payload == wire["p"]:
        return
    wire["p"] = payload
    with pytest.raises(RecordError):
        decode_record(wire, NOW)  # either not msgpack, not a map, or the signature no longer covers it


def test_store_newer_seq_replaces_older_and_older_is_refused() -> None:
    store = RecordStore()
    store.put(_rec(seq=1, load=1), "10.0.0.1", NOW)
    store.put(_rec(seq=2, load=2), "10.0.0.1", NOW)
    assert [r.payload["load"] for r in store.get(TOPIC, NOW)] == [2]
    with pytest.raises(RecordError) as e:
        store.put(_rec(seq=1, load=3), "10.0.0.1", NOW)
    assert e.value.code == ERR_CONFLICT
    assert len(store) == 1


def test_store_holds_many_peers_per_topic_and_expires_them() -> None:
    store = RecordStore()
    idents = [Identity.generate() for _ in range(5)]
    for i, ident in enumerate(idents):
        store.put(_rec(ident, ttl=10 + i), "10.0.0.1", NOW)
    assert len(store.get(TOPIC, NOW)) == 5
    assert len(store.get(TOPIC, NOW + 12.5)) == 2
    assert store.expire(NOW + 100) == 2
    assert len(store) == 0


def test_store_caps_per_topic_per_source_and_total() -> None:
    store = RecordStore(max_per_topic=3, max_per_source=2, max_total=4)
    store.put(_rec(Identity.generate()), "10.0.0.1", NOW)
    store.put(_rec(Identity.generate()), "10.0.0.1", NOW)
    with pytest.raises(RecordError) as e:
        store.put(_rec(Identity.generate()), "10.0.0.1", NOW)
    assert e.value.code == ERR_OVERLOADED and "source" in e.value.message
    store.put(_rec(Identity.generate()), "10.0.0.2", NOW)
    # the topic is full, but 10.0.0.1 holds two: one of them makes room for a new source
    store.put(_rec(Identity.generate()), "10.0.0.3", NOW)
    assert store.evicted == 1 and len(store.get(TOPIC, NOW)) == 3
    with pytest.raises(RecordError, match="topic"):  # every source holds one: nothing fairer to do
        store.put(_rec(Identity.generate()), "10.0.0.5", NOW)
    other = make_record(Identity.generate(), topic_from_name("b"), [], None, 1, 60, NOW)
    store.put(other, "10.0.0.3", NOW)
    with pytest.raises(RecordError, match="cap of 4"):
        store.put(
            make_record(Identity.generate(), topic_from_name("c"), [], None, 1, 60, NOW), "10.0.0.4", NOW
        )


def test_a_few_sources_that_fill_a_topic_cannot_keep_a_newcomer_out() -> None:
    """256 records from 4 addresses filled WORKERS on its holder; a new worker must still get in."""
    store = RecordStore(max_per_topic=256, max_per_source=64)
    flood = [Identity.generate() for _ in range(256)]
    for i, ident in enumerate(flood):
        store.put(_rec(ident, ttl=600), f"203.0.113.{i % 4}", NOW)
    assert len(store.get(TOPIC, NOW)) == 256
    newcomers = [Identity.generate() for _ in range(8)]
    for i, ident in enumerate(newcomers):
        store.put(_rec(ident, ttl=60), f"198.51.100.{i}", NOW)
    held = {r.public_key for r in store.get(TOPIC, NOW)}
    assert {i.public_key for i in newcomers} <= held
    assert len(held) == 256 and store.evicted == 8
    # the flooders' own re-announcements cannot push the newcomers out again
    for ident in flood[:64]:
        with contextlib.suppress(RecordError):
            store.put(_rec(ident, ttl=600), "203.0.113.0", NOW)
    assert {i.public_key for i in newcomers} <= {r.public_key for r in store.get(TOPIC, NOW)}


def test_store_reply_budget_returns_a_subset_that_fits() -> None:
    store = RecordStore()
    for _ in range(20):
        store.put(_rec(Identity.generate(), pad=b"x" * 500), "10.0.0.1", NOW)
    got = store.get(TOPIC, NOW, budget=3000)
    assert 1 <= len(got) < 20
    assert sum(len(msgpack.packb(r.to_wire())) for r in got) <= 3000


def test_unannounce_removes_only_with_the_owners_signature() -> None:
    store = RecordStore()
    store.put(_rec(seq=3), "10.0.0.1", NOW)
    forged = dataclasses.replace(Unannounce.make(MALLORY, TOPIC, 3), public_key=ALICE.public_key)
    with pytest.raises(RecordError) as e:
        Unannounce.from_wire(forged.to_wire())
    assert e.value.code == ERR_FORBIDDEN
    assert not store.remove(Unannounce.from_wire(Unannounce.make(ALICE, TOPIC, 2).to_wire()))  # older seq
    assert store.remove(Unannounce.from_wire(Unannounce.make(ALICE, TOPIC, 3).to_wire()))
    assert store.get(TOPIC, NOW) == []


def test_token_is_bound_to_the_address_and_rotates_out() -> None:
    tokens = TokenIssuer(rotation=300, now=NOW)
    tk = tokens.issue(("10.0.0.1", 5000), NOW)
    assert tokens.check(tk, ("10.0.0.1", 5000), NOW + 10)
    assert not tokens.check(tk, ("10.0.0.2", 5000), NOW)
    assert not tokens.check(tk, ("10.0.0.1", 5001), NOW)
    assert tokens.check(tk, ("10.0.0.1", 5000), NOW + 301)  # previous secret still accepted
    assert not tokens.check(tk, ("10.0.0.1", 5000), NOW + 700)
    assert not tokens.check(b"short", ("10.0.0.1", 5000), NOW)
    assert not tokens.check(None, ("10.0.0.1", 5000), NOW)
