"""The replication planner and catalog merge, as pure functions; and the core's replica paths."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from store_models import onnx_bytes

from swarmd.names import ModelMeta
from swarmd.store.config import StoreConfig
from swarmd.store.core import ModelStore, PushRequest
from swarmd.store.replication import Pull, plan_replication, rows_to_adopt

D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


def test_under_replicated_blob_gets_pulled_to_factor() -> None:
    pulls = plan_replication({"a": {D1}, "b": set(), "c": set()}, live={"a", "b", "c"}, factor=2)
    assert len(pulls) == 1
    (p,) = pulls
    assert p.digest == D1 and p.source == "a" and p.store in {"b", "c"}
    pulls = plan_replication({"a": {D1}, "b": set(), "c": set()}, live={"a", "b", "c"}, factor=3)
    assert sorted(pulls) == [Pull("b", D1, "a"), Pull("c", D1, "a")]


def test_fully_replicated_needs_nothing() -> None:
    assert plan_replication({"a": {D1, D2}, "b": {D1, D2}}, live={"a", "b"}, factor=2) == []
    assert plan_replication({"a": {D1}, "b": {D1}, "c": {D1}}, live={"a", "b", "c"}, factor=2) == []


def test_dead_store_does_not_count_and_survivors_restore() -> None:
    holdings = {"a": {D1}, "b": {D1}, "c": set()}
    assert plan_replication(holdings, live={"a", "b", "c"}, factor=2) == []
    pulls = plan_replication(holdings, live={"a", "c"}, factor=2)  # b died
    assert pulls == [Pull("c", D1, "a")]


def test_lost_blob_and_small_swarm() -> None:
    assert plan_replication({"a": {D1}}, live={"b"}, factor=2) == []  # nobody live holds it
    assert plan_replication({"a": {D1}}, live={"a"}, factor=3) == []  # factor capped by live stores
    assert plan_replication({"a": {D1}}, live={"a", "b"}, factor=0) == []


def test_repair_pulls_come_first_even_at_factor() -> None:
    pulls = plan_replication({"a": {D1}, "b": {D1}, "c": set()}, live={"a", "b", "c"}, factor=2,
                             wanted={"c": {D1}})
    assert [(p.store, p.digest) for p in pulls] == [("c", D1)]
    pulls = plan_replication({"a": {D1}, "b": set(), "c": set()}, live={"a", "b", "c"}, factor=2,
                             wanted={"c": {D1}})
    assert [(p.store, p.digest) for p in pulls] == [("c", D1)]  # the repair also fills the factor


def test_refusing_store_is_skipped() -> None:
    pulls = plan_replication({"a": {D1}, "b": set(), "c": set()}, live={"a", "b", "c"}, factor=2,
                             refused={"b": {D1}})
    assert pulls == [Pull("c", D1, "a")]


keys = st.sampled_from(["s0", "s1", "s2", "s3", "s4", "s5"])
digests = st.sampled_from([D1, D2, D3])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(keys, st.sets(digests), max_size=6),
    st.sets(keys, max_size=6),
    st.integers(min_value=0, max_value=7),
)
def test_plan_properties(holdings: dict[str, set[str]], live: set[str], factor: int) -> None:
    pulls = plan_replication(holdings, live, factor)
    assert plan_replication(holdings, list(reversed(sorted(live))), factor) == pulls  # order-independent
    after = {s: set(holdings.get(s, set())) for s in live}
    for p in pulls:
        assert p.store in live and p.source in live
        assert p.digest in holdings[p.source] and p.digest not in holdings.get(p.store, set())
        after[p.store].add(p.digest)
    assert len(set(pulls)) == len(pulls)
    for d in {d for s in live for d in holdings.get(s, set())}:
        count = sum(d in after[s] for s in live)
        held = sum(d in holdings.get(s, set()) for s in live)
        assert count == max(held, min(factor, len(live)))


def meta(name: str, version: str, digest: str, updated: float, deleted: float | None = None) -> ModelMeta:
    return ModelMeta(name, version, digest, 10, created=1.0, updated=updated, deleted=deleted)


def test_rows_to_adopt_spreads_newer_deletions_of_held_rows_only() -> None:
    local = {("m", "1"): meta("m", "1", D1, 5.0), ("m", "2"): meta("m", "2", D2, 9.0),
             ("m", "5"): meta("m", "5", D1, 5.0)}
    remote = [
        meta("m", "1", D1, 6.0, deleted=6.0),  # newer delete: adopt
        meta("m", "2", D2, 8.0, deleted=8.0),  # older than our row: keep ours
        meta("m", "3", D3, 7.0, deleted=7.0),  # a row we do not hold: never written, only reported
        meta("m", "4", D3, 7.0),  # unknown live row: comes through a pull, not here
        meta("m", "1", D2, 99.0, deleted=99.0),  # another digest under our version: never
        meta("m", "5", D1, 1e12, deleted=1e12),  # stamped in the future: a peer's clock is not taken
    ]
    adopt, unheld = rows_to_adopt(lambda n, v: local.get((n, v)), remote, now=100.0)
    assert [(r.version, r.digest) for r in adopt] == [("1", D1)]
    assert [(r.version, r.digest) for r in unheld] == [("3", D3)]


def test_catalog_changes_are_paged_by_a_cursor(tmp_path: Path) -> None:
    from swarmd.store.catalog import Catalog

    cat = Catalog(tmp_path / "meta.sqlite")
    for i in range(5):
        cat.upsert(meta("m", str(i), D1, float(i)))
    rows, cursor, head = cat.changes(0, 3)
    assert [r.version for r in rows] == ["0", "1", "2"] and head == 5
    rows, cursor, head = cat.changes(cursor, 3)
    assert [r.version for r in rows] == ["3", "4"] and cursor == head
    assert cat.changes(cursor, 3)[0] == []  # nothing new: nothing sent
    row = cat.row("m", "1")
    row.deleted = row.updated = 9.0
    cat.upsert(row)  # a tombstone is a change
    assert [r.version for r in cat.changes(cursor, 3)[0]] == ["1"]
    cat.close()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "s", StoreConfig())
    yield s
    s.close()


def test_complete_replica_respects_local_state(store: ModelStore) -> None:
    data = onnx_bytes(21)
    d = hashlib.sha256(data).hexdigest()
    # a remote tombstone for a row we do not hold writes nothing
    assert store.apply_tombstones([meta("m", "1", d, 50.0, deleted=50.0)]) == []
    assert store.catalog.list(include_deleted=True) == []
    # a newer local tombstone refuses the copy; the blob is not kept
    up = store.begin(PushRequest("m", d, len(data), "1"))
    up.write(data)
    (pushed,) = store.complete_replica(up, [meta("m", "1", d, 40.0)])
    store.delete("m", "1")
    store.catalog.upsert(dataclasses.replace(store.catalog.row("m", "1"), deleted=50.0, updated=50.0))
    up = store.begin(PushRequest("m", d, len(data), "1"))
    up.write(data)
    assert store.complete_replica(up, [meta("m", "1", d, 10.0)]) == []
    assert store.blobs.digests() == set() and store.list() == []
    # a newer live row revives it, with the origin's created/uploader
    row = meta("m", "1", d, 60.0)
    row.uploader = "ef" * 32
    row.tags = ["a"]
    up = store.begin(PushRequest("m", d, len(data), "1"))
    up.write(data)
    (got,) = store.complete_replica(up, [row])
    assert got.created == 1.0 and got.uploader == "ef" * 32 and got.tags == ["a"]
    assert got.inputs == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert store.holdings() == {d}
    # and a newer remote deletion removes it and its blob
    assert [r.version for r in store.apply_tombstones([meta("m", "1", d, 70.0, deleted=70.0)])] == ["1"]
    assert store.list() == [] and store.blobs.digests() == set()
