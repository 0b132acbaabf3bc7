"""The `book` worker: a whole thing worker in a few overridden methods.

Run one (it starts a swarmd node serving the thing methods over RPC and
announces itself on the RACKS topic, so an ork finds it with no configuration):

    python examples/book_worker.py --data-dir /tmp/books1 [--bootstrap HOST:PORT]

then, from another terminal, with the public key it printed in its ready line:

    swarmd call KEY registerThing --data '{"info": {"title": "Dune", "isbn": "9780441013593"}}'
    swarmd call KEY listThings --data '{"query": {"info.title": {"$contains": "dune"}}}'
    swarmd call KEY updateThing --data '{"id": "...", "info": {"checked_out_by": "ana"}}'
    swarmd call KEY tailLog --data '{"limit": 5}'
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarmd.services.things import Thing, ThingService, bad_request, now_ms  # noqa: E402

ISBN_RE = re.compile(r"^(\d{9}[\dX]|\d{13})$")


class Books(ThingService):
    """A library shelf: books are registered, checked out, returned, lost."""

    TYPE = "book"
    UNIQUE_KEYS = ("info.isbn",)

    def validate_thing(self, thing: Thing, previous: Thing | None) -> None:
        title = thing.info.get("title")
        if not isinstance(title, str) or not 0 < len(title) <= 300:
            raise bad_request("info.title must be a string of 1 to 300 characters")
        isbn = thing.info.get("isbn")
        if isbn is not None and (not isinstance(isbn, str) or not ISBN_RE.match(isbn)):
            raise bad_request(f"info.isbn must be 10 or 13 digits (ISBN-10 may end in X), got {isbn!r:.40}")
        who = thing.info.get("checked_out_by")
        if who is not None and (not isinstance(who, str) or not who):
            raise bad_request("info.checked_out_by must be a non-empty string, or null to return the book")
        lost = thing.info.get("lost", False)
        if not isinstance(lost, bool):
            raise bad_request("info.lost must be true or false")

    def thing_tags(self, thing: Thing) -> list[str]:
        return ["t-book", *(["lost"] if thing.info.get("lost") else [])]

    async def collect_thing_snap(self, thing: Thing) -> dict[str, Any]:
        checked_out = thing.info.get("checked_out_by") is not None
        return {
            "is_available": not checked_out and not thing.info.get("lost", False),
            "is_checked_out": checked_out,
            "ts": now_ms(),
        }


if __name__ == "__main__":
    from swarmd.plugins import run_thing_worker

    sys.exit(run_thing_worker(Books, name="books", rack_type="book"))
