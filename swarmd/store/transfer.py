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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_CORRUPT, ERR_PROTOCOL, SwarmdError

CHUNK = 256 * 1024
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            h.update(buf)
            n += len(buf)
    return h.hexdigest(), n


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
    digest, size = await asyncio.to_thread(_sha256_file, path)
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
    try:
        f = await asyncio.to_thread(open, path, "rb")
        with f:
            f.seek(offset)
            done = offset
            if progress is not None:
                progress(done, size)
            while buf := f.read(chunk):
                async with asyncio.timeout(timeout):
                    await stream.send(buf)
                done += len(buf)
                if progress is not None:
                    progress(done, size)
        await stream.close()
    except BaseException:
        stream.abort()
        # the store's own error says more than our broken pipe does
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(stream.result(), 1.0)
        raise
    return await stream.result()


async def pull_stream(
    peer: Any,
    digest: str,
    offset: int,
    write: Callable[[bytes], None],
    *,
    progress: Progress | None = None,
    size: int | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Receive blob digest from offset into write(); returns the store's {size, digest}. Unverified."""
    stream = await peer.open_stream("downloadBlob", {"digest": digest, "offset": offset})
    done = offset
    try:
        while True:
            async with asyncio.timeout(timeout):
                buf = await stream.recv()
            if buf is None:
                break
            write(buf)
            done += len(buf)
            if size is not None and done > size:
                raise SwarmdError(ERR_PROTOCOL, f"store sent more than the {size} bytes of blob {digest}")
            if progress is not None and size is not None:
                progress(done, size)
    except BaseException:
        stream.abort()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(stream.result(), 1.0)
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
    """Download blob digest to dest (atomically, verified); resumes from dest + '.part'. Returns its size."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    offset = 0
    if part.exists():
        offset = part.stat().st_size
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        else:
            h = await asyncio.to_thread(lambda: _prefix_hash(part))
    f = await asyncio.to_thread(open, part, "ab")
    with f:

        def write(buf: bytes) -> None:
            f.write(buf)
            h.update(buf)

        result = await pull_stream(peer, digest, offset, write, progress=progress, size=size, timeout=timeout)
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != digest:
        part.unlink()
        raise SwarmdError(ERR_CORRUPT, f"downloaded bytes hash to {h.hexdigest()}, expected {digest}")
    os.replace(part, dest)
    return _int(result, "size")


def _prefix_hash(path: Path) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            h.update(buf)
    return h


def parse_ref(text: str) -> tuple[str, str | None]:
    """'name[:version]' -> (name, version or None)."""
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        raise SwarmdError(ERR_BAD_REQUEST, f"model reference must look like NAME or NAME:VERSION, got {text!r}")
    return name, (version if sep else None)
