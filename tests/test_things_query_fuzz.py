"""Queries, projections and sorts come from peers: any value is either refused
with ValueError or evaluated without raising, on any document."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from swarmd.services.query import apply_sort, compile_projection, compile_query, compile_sort

keys = st.sampled_from(["id", "info.n", "tags", "last.online", "$and", "$or", "$nor", "$eq", "$gt", "$in",
                        "$exists", "$contains", "$lt", "$ne", "$nin", "$gte", "$lte", "$x", "", "a.0"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=4),
                    st.binary(max_size=3))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(keys, c, max_size=3)),
                      max_leaves=12)
docs = st.fixed_dictionaries({
    "id": st.text(max_size=3),
    "tags": st.lists(st.text(max_size=2), max_size=3),
    "info": st.dictionaries(st.sampled_from(["n", "t"]), scalars, max_size=2),
    "last": st.dictionaries(st.just("online"), st.booleans()),
})


@settings(max_examples=300, deadline=None)
@given(values, st.lists(docs, max_size=4))
def test_query_refuses_or_evaluates(query: Any, documents: list[dict[str, Any]]) -> None:
    try:
        pred = compile_query(query)
    except ValueError:
        return
    for d in documents:
        assert pred(d) in (True, False)


@settings(max_examples=200, deadline=None)
@given(values, values, st.lists(docs, max_size=4))
def test_projection_and_sort_refuse_or_work(fields: Any, sort: Any, documents: list[dict[str, Any]]) -> None:
    try:
        project = compile_projection(fields)
    except ValueError:
        project = None
    try:
        keys_ = compile_sort(sort)
    except ValueError:
        keys_ = []
    out = apply_sort(documents, keys_)
    assert len(out) == len(documents)
    if project is not None:
        for d in out:
            assert isinstance(project(d), dict)
