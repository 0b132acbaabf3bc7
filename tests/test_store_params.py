"""Hostile params and peer catalog rows: the store answers with a precise code, never a crash."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_models import write_model

from swarmd.errors import ALL_CODES, ERR_BAD_REQUEST, SwarmdError
from swarmd.roles.store import StoreRole
from swarmd.roles.store_replication import meta_from_wire
from swarmd.settings import Settings
from tests.conftest import node_context


@pytest.fixture
async def role(tmp_path: Path) -> StoreRole:
    r = StoreRole(node_context(tmp_path, "store"))  # no RPC server: the handlers are called directly
    await r.start()
    r.core.put_file(write_model(tmp_path / "m.onnx", seed=1), "m", "1")
    yield r
    await r.stop()


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70),
                    st.binary(max_size=20))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)
keys = st.sampled_from(["name", "version", "tag", "digest", "include_deleted", "sha256", "offset", "size", "x"])
params = st.one_of(values, st.dictionaries(keys, values, max_size=4))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["list_models", "get_model", "upload_status", "store_state"]), p=params)
async def test_read_methods_never_crash(role: StoreRole, method: str, p: Any) -> None:
    try:
        result = await getattr(role, method)(None, p)
        assert isinstance(result, dict)
    except SwarmdError as e:
        assert e.code in ALL_CODES


row_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.just("m"), values), "version": st.one_of(st.just("1"), values),
        "digest": st.one_of(st.just("a" * 64), values), "size": st.one_of(st.integers(), values),
        "created": st.one_of(st.floats(), values), "updated": st.one_of(st.floats(), values),
        "deleted": st.one_of(st.none(), st.floats(), values), "tags": st.one_of(st.lists(st.text(max_size=5)), values),
        "uploader": values, "description": values, "format": values,
    },
)


@settings(max_examples=100, deadline=None)
@given(row=st.one_of(values, row_fields))
def test_peer_catalog_rows_are_checked(row: Any) -> None:
    try:
        m = meta_from_wire(row)
    except SwarmdError as e:
        assert e.code == ERR_BAD_REQUEST
        return
    assert isinstance(m.name, str) and isinstance(m.size, int) and m.size >= 0
    assert all(isinstance(t, str) for t in m.tags)
    assert isinstance(m.created, float) and (m.deleted is None or isinstance(m.deleted, float))
    assert all(math.isfinite(t) for t in (m.created, m.updated, m.deleted or 0.0))


@pytest.mark.parametrize("key,value", [("max_model_bytes", 0), ("replication_factor", 0), ("chunk_bytes", 64 << 20),
                                       ("replicate_interval", -1.0), ("scrub_per_round", -1)])
def test_bad_store_config_is_refused(tmp_path: Path, key: str, value: Any) -> None:
    from swarmd.errors import ERR_CONFIG

    settings = Settings()
    settings.trust.open = True
    setattr(settings.store, key, value)
    with pytest.raises(SwarmdError) as e:
        StoreRole(node_context(tmp_path, "store", settings=settings))
    assert e.value.code == ERR_CONFIG and f"store.{key}" in e.value.message
