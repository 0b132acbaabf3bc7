"""One bounded wait that never swallows a cancellation.

``asyncio.wait_for`` on Python 3.11 returns the inner result when its own
task is cancelled in the same loop iteration as the inner awaitable finishes:
the cancellation is lost, and a task told to stop keeps running (a node that
hangs on stop or on a failed start, ignoring SIGTERM). ``asyncio.timeout``
has no such window. ``within`` is ``wait_for``'s shape on top of it, so every
bounded wait in swarmd reads the same and cancels correctly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 (wait_for's signature)
    """await aw, raising TimeoutError after timeout seconds (None: no bound)."""
    async with asyncio.timeout(timeout):
        return await aw
