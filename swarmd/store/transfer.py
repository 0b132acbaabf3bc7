"""Client side of the store's streams: push a file, pull a blob, both resumable and verified.

Used by the CLI, by stores pulling replicas from each other and by the
benchmark. Each function takes a connected peer (anything with `call` and
`open_stream`, i.e. swarmd.rpc.RpcPeer) so the caller decides how it reached
the store (swarm lookup or a known address).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_CORRUPT, ERR_PROTOCOL, SwarmdError
from swarmd.node.deadline import within
from swarmd.store.blobs import hash_file, write_all

CHUNK = 1 << 20  # file read per stream.send: the stream cuts it into frames; fewer, larger reads cost less
BATCH = 2 << 20  # received bytes handed to a writer thread at once
Progress = Callable[[int, int], None]  # (bytes done, bytes total)
WriteMany = Callable[[list[bytes]], None]  # hash + append chunks, called from a worker thread


class BatchWriter:
    """Hands received chunks to `write` in a worker thread, a batch at a time with one batch in
    flight, so hashing and disk writes (both release the GIL) overlap with the event loop
    decrypting what follows, and no chunk is copied into a joined buffer.

    `flush()` writes what is left and raises the error of any batch; after a failure or a
    cancel, `salvage()` (plain, not async, so a second cancel cannot cut it short) waits for
    the batch in flight and writes what was received after it, for a resume.
    """

    def __init__(self, write: WriteMany, batch: int = BATCH) -> None:
        self._write = write
        self._batch = batch
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._task: asyncio.Future[None] | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._failed = False

    async def add(self, buf: bytes) -> None:
        self._pending.append(buf)
        self._pending_bytes += len(buf)
        if self._pending_bytes >= self._batch:
            await self._submit()

    async def flush(self) -> None:
        if self._pending:
            await self._submit()
        await self._settle()

    def salvage(self) -> None:
        self._idle.wait()  # at most one batch's write: never close a file under the thread
        pending, self._pending = self._pending, []
        if pending and not self._failed:
            with contextlib.suppress(SwarmdError, OSError):
                self._write(pending)

    def _run(self, bufs: list[bytes]) -> None:
        try:
            self._write(bufs)
        except BaseException:
            self._failed = True
            raise
        finally:
            self._idle.set()

    async def _submit(self) -> None:
        await self._settle()
        bufs, self._pending, self._pending_bytes = self._pending, [], 0
        self._idle.clear()
        self._task = asyncio.ensure_future(asyncio.to_thread(self._run, bufs))
        self._task.add_done_callback(_retrieve)  # flush() reports it; after a failure nobody asks

    async def _settle(self) -> None:
        task = self._task
        if task is not None:
            await asyncio.shield(task)  # a cancel leaves the write running; salvage() waits for it
            self._task = None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class ReadAhead:
    """Chunks of a file from a worker thread, the next read in flight while the caller sends
    this one; `hash` (if given) is updated in that thread too."""

    def __init__(self, path: Path, offset: int, chunk: int, hash: Any = None) -> None:  # noqa: A002
        self._path = path
        self._offset = offset
        self._chunk = chunk
        self._hash = hash
        self._f: Any = None
        self._next: asyncio.Future[bytes] | None = None

    def _read(self) -> bytes:
        if self._f is None:
            self._f = open(self._path, "rb")  # noqa: SIM115 - closed by close()
            self._f.seek(self._offset)
        buf = self._f.read(self._chunk)
        if buf and self._hash is not None:
            self._hash.update(buf)
        return buf

    async def next(self) -> bytes:
        """The next chunk; b"" at the end of the file."""
        if self._next is None:
            self._next = asyncio.ensure_future(asyncio.to_thread(self._read))
        buf = await asyncio.shield(self._next)  # on a cancel the read stays in _next for close()
        self._next = asyncio.ensure_future(asyncio.to_thread(self._read)) if buf else None
        return buf

    async def close(self) -> None:
        fut, self._next = self._next, None
        if fut is not None:
            try:
                await asyncio.wait({fut})  # the thread holds the file: let it finish first
            except asyncio.CancelledError:
                fut.add_done_callback(lambda _: self._close_file())
                raise
            _retrieve(fut)
        self._close_file()

    def _close_file(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()


def _int(obj: Any, key: str) -> int:
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SwarmdError(ERR_PROTOCOL, f"store answered without a valid {key!r}: {obj!r:.120}")
    return v


async def push_file(
    peer: Any,
    path: Path,
    name: str,
    version: str | None = None,
    *,
    tags: list[str] | None = None,
    description: str | None = None,
    chunk: int = CHUNK,
    progress: Progress | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Upload path as name[:version]; resumes from what the store already has. Returns the metadata."""
    size = (await asyncio.to_thread(path.stat)).st_size
    digest = (await asyncio.to_thread(hash_file, path, size)).hexdigest()
    status = await peer.call("uploadStatus", {"sha256": digest}, timeout=timeout)
    offset = min(_int(status, "received"), size)
    params: dict[str, Any] = {"name": name, "size": size, "sha256": digest, "offset": offset}
    if version is not None:
        params["version"] = version
    if tags:
        params["tags"] = list(tags)
    if description is not None:
        params["description"] = description
    stream = await peer.open_stream("uploadModel", params)
    reader = ReadAhead(path, offset, chunk)
    try:
        done = offset
        if progress is not None:
            progress(done, size)
        while buf := await reader.next():
            async with asyncio.timeout(timeout):
                await stream.send(buf)
            done += len(buf)
            if progress is not None:
                progress(done, size)
        await stream.close()
    except BaseException:
        await _abort(stream)
        raise
    finally:
        await reader.close()
    return await stream.result()


async def _abort(stream: Any) -> None:
    stream.abort()
    with contextlib.suppress(BaseException):  # the store's own error says more than our broken pipe
        await within(stream.result(), 1.0)


async def pull_stream(
    peer: Any,
    digest: str,
    offset: int,
    write: WriteMany,
    *,
    progress: Progress | None = None,
    size: int | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Receive blob digest from offset into write() (called from a worker thread, a batch of
    chunks at a time, in order); returns the store's {size, digest}. Unverified. Bytes that
    arrived before a failure are written too, so the caller can resume after them."""
    stream = await peer.open_stream("downloadBlob", {"digest": digest, "offset": offset})
    writer = BatchWriter(write)
    done = offset
    try:
        while True:
            async with asyncio.timeout(timeout):
                buf = await stream.recv()
            if buf is None:
                break
            done += len(buf)
            if size is not None and done > size:
                raise SwarmdError(ERR_PROTOCOL, f"store sent more than the {size} bytes of blob {digest}")
            await writer.add(buf)
            if progress is not None and size is not None:
                progress(done, size)
        await writer.flush()
    except BaseException:
        writer.salvage()
        await _abort(stream)
        raise
    result = await stream.result()
    if _int(result, "size") != done:
        raise SwarmdError(ERR_PROTOCOL, f"store said blob {digest} has {result.get('size')} bytes, got {done}")
    return result


async def pull_file(
    peer: Any,
    digest: str,
    dest: Path,
    *,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
) -> int:
    """Download blob digest to dest (atomically, verified); resumes from dest + '.part'. Returns its size.

    The bytes are hashed and written in a worker thread while the next ones arrive, and
    fsynced once, at the end."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    offset = 0
    if part.exists():
        offset = part.stat().st_size
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        else:
            h = await asyncio.to_thread(hash_file, part)
    fd = await asyncio.to_thread(os.open, part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:

        def write(bufs: list[bytes]) -> None:
            for b in bufs:
                h.update(b)
            write_all(fd, bufs)

        result = await pull_stream(peer, digest, offset, write, progress=progress, size=size, timeout=timeout)
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
    if h.hexdigest() != digest:
        part.unlink()
        raise SwarmdError(ERR_CORRUPT, f"downloaded bytes hash to {h.hexdigest()}, expected {digest}")
    os.replace(part, dest)
    return _int(result, "size")


def parse_ref(text: str) -> tuple[str, str | None]:
    """'name[:version]' -> (name, version or None)."""
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        raise SwarmdError(ERR_BAD_REQUEST, f"model reference must look like NAME or NAME:VERSION, got {text!r}")
    return name, (version if sep else None)
