"""Every thing method takes params a peer decoded from msgpack: whatever they
are, the answer is a result or a SwarmdError with a known code, never another
exception, and the service keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.book_worker import Books
from swarmd.errors import ALL_CODES, SwarmdError
from swarmd.services.things import THING_METHODS, ThingsConfig

names = st.sampled_from(["id", "ids", "info", "opts", "tags", "query", "fields", "sort", "limit", "offset", "all",
                         "rev", "title", "info.title", "$or", "$gt", "start", "end", "type", "x"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64), st.floats(), st.text(max_size=6),
                    st.binary(max_size=4))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(names, c, max_size=3)),
                      max_leaves=10)
params = st.one_of(values, st.dictionaries(names, values, max_size=4))


@pytest.fixture(scope="module")
def books_on_a_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.AbstractEventLoop, Books]]:
    """One service for all examples (each example starts by forgetting everything):
    a fresh SQLite file per example would make this test slow on a shared machine."""
    loop = asyncio.new_event_loop()
    books = Books("books", tmp_path_factory.mktemp("fuzz"), ThingsConfig(snapshot_interval_s=0))
    loop.run_until_complete(books.start())
    yield loop, books
    loop.run_until_complete(books.stop())
    loop.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(st.sampled_from(sorted(THING_METHODS)), params), min_size=1, max_size=6))
def test_any_params_get_a_result_or_a_coded_error(
    books_on_a_loop: tuple[asyncio.AbstractEventLoop, Books], calls: list[tuple[str, Any]]
) -> None:
    loop, books = books_on_a_loop

    async def run() -> None:
        await books.call("forgetThings", {"all": True})
        await books.call("registerThing", {"id": "dune", "info": {"title": "Dune"}})
        for method, p in calls:
            try:
                await books.call(method, p)
            except SwarmdError as e:
                assert e.code in ALL_CODES and e.message
        assert isinstance(await books.call("listThings", {}), list)

    loop.run_until_complete(run())
