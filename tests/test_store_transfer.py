"""BatchWriter and ReadAhead: the thread hand-offs under store transfers keep order, errors and bytes."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest

from swarmd.errors import ERR_TOO_LARGE, SwarmdError
from swarmd.store.transfer import BatchWriter, ReadAhead


async def test_batch_writer_keeps_order_and_writes_off_the_loop() -> None:
    got: list[bytes] = []
    threads: set[int] = set()

    def write(bufs: list[bytes]) -> None:
        threads.add(threading.get_ident())
        got.extend(bufs)

    w = BatchWriter(write, batch=10)
    chunks = [bytes([i]) * (i + 3) for i in range(40)]
    for c in chunks:
        await w.add(c)
    await w.flush()
    assert got == chunks
    assert threading.get_ident() not in threads


async def test_batch_writer_reports_a_failed_batch_and_salvage_skips_after_it() -> None:
    calls: list[list[bytes]] = []

    def write(bufs: list[bytes]) -> None:
        calls.append(bufs)
        raise SwarmdError(ERR_TOO_LARGE, "too much")

    w = BatchWriter(write, batch=4)
    await w.add(b"12345")  # a batch goes to the thread and fails there
    with pytest.raises(SwarmdError) as e:
        await w.add(b"678910")  # the next hand-off reports it
    assert e.value.code == ERR_TOO_LARGE
    w.salvage()  # nothing more is written after a failed batch: the file would have a hole
    assert calls == [[b"12345"]]


async def test_salvage_after_a_cancel_waits_for_the_batch_in_flight_then_writes_the_rest() -> None:
    release = threading.Event()
    started = threading.Event()
    got: list[bytes] = []

    def write(bufs: list[bytes]) -> None:
        started.set()
        release.wait(30)
        got.extend(bufs)

    w = BatchWriter(write, batch=4)
    await w.add(b"aaaa")  # in flight, blocked in the thread

    async def more() -> None:
        await w.add(b"bbbb")  # waits for the first batch

    task = asyncio.create_task(more())
    await asyncio.to_thread(started.wait, 30)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    threading.Timer(0.05, release.set).start()
    w.salvage()
    assert got == [b"aaaa", b"bbbb"]


async def test_read_ahead_reads_and_hashes_from_an_offset(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    p = tmp_path / "f"
    p.write_bytes(data)
    h = hashlib.sha256()
    r = ReadAhead(p, 1000, 4096, h)
    out = []
    while buf := await r.next():
        out.append(buf)
    await r.close()
    assert b"".join(out) == data[1000:]
    assert h.digest() == hashlib.sha256(data[1000:]).digest()
    r2 = ReadAhead(p, 0, 4096)
    assert await r2.next() == data[:4096]
    await r2.close()  # a read still in flight is awaited before the file closes
