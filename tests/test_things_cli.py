"""`swarmd things` reads what a thing service left in the data dir, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from examples.book_worker import Books
from swarmd.services.things import ThingsConfig
from tests.conftest import run_cli


async def test_things_cli_lists_and_tails(tmp_path: Path) -> None:
    async with Books("books", tmp_path, ThingsConfig(snapshot_interval_s=0)) as books:
        await books.call("registerThing", {"id": "dune", "info": {"title": "Dune"}, "opts": {"shelf_key": "s"}})
        await books.call("registerThing", {"id": "emma", "info": {"title": "Emma"}})
        await books.collect_snaps()
    out = run_cli("things", "--data-dir", str(tmp_path), "services")
    assert out.returncode == 0 and out.stdout.split() == ["books"]
    out = run_cli("things", "--data-dir", str(tmp_path), "list", "books", "--query", '{"info.title": "Emma"}',
                  "--fields", '{"info.title": 1}')
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [{"id": "emma", "info": {"title": "Emma"}}]
    out = run_cli("things", "--data-dir", str(tmp_path), "list", "books")
    assert "shelf_key" not in out.stdout
    out = run_cli("things", "--data-dir", str(tmp_path), "tail", "books", "--id", "dune")
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(entries) == 1 and entries[0]["snap"]["is_available"] is True
    bad = run_cli("things", "--data-dir", str(tmp_path), "list", "books", "--query", "{nope")
    assert bad.returncode != 0 and "ERR_BAD_REQUEST" in bad.stderr
    missing = run_cli("things", "--data-dir", str(tmp_path), "list", "nosuch")
    assert missing.returncode != 0 and "ERR_NOT_FOUND" in missing.stderr
