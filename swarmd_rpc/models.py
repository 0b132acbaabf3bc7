"""Model operations on the swarm's stores: `client.models.push/pull/list/get/rm`.

Stores are found on the DHT (the model's topic, else every store); a store
that fails in a way another may not share (`swarmd.errors.retryable`, or a copy
that fails its digest) is replaced by the next; transfers are the store's
streams through swarmd.store.transfer (resumed, verified, written atomically).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmd.errors import ERR_BAD_REQUEST, ERR_CORRUPT, ERR_NOT_FOUND, ERR_UNAVAILABLE, SwarmdError, retryable
from swarmd.store.transfer import Progress, pull_file, push_file
from swarmd.topics import STORES, model_topic
from swarmd_rpc.errors import translated

if TYPE_CHECKING:
    from swarmd_rpc.client import Client


def _next_store(e: SwarmdError) -> bool:
    """Another store may do better: what failover calls retryable, or a copy that failed its digest."""
    return retryable(e) or e.code == ERR_CORRUPT


def pull_destination(path: str | Path, name: str, version: str) -> Path:
    """Where `pull` writes: path itself, or path/NAME-VERSION.onnx when path is a directory (or ends
    with a slash). The directory must exist: a typo is a one-line error, not a tree made by accident."""
    text = str(path)
    p = Path(path).expanduser()
    if text.endswith(("/", "\\")) or p.is_dir():
        if not p.is_dir():
            raise SwarmdError(ERR_BAD_REQUEST, f"directory {p} does not exist")
        return p / f"{name}-{version}.onnx"
    if not p.parent.is_dir():
        raise SwarmdError(ERR_BAD_REQUEST, f"cannot write {p}: directory {p.parent} does not exist")
    return p


class Models:
    """Model operations on the swarm's stores: `client.models.push/pull/list/get/rm`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @translated
    async def push(
        self,
        path: str | Path,
        name: str,
        version: str | None = None,
        *,
        tags: list[str] | None = None,
        description: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Upload an ONNX file as name[:version] to one store (replication spreads it); resumes what
        the store already has. progress(done, total) is called as bytes go out. Returns the metadata."""
        c = self._client
        await c._ready()
        path = Path(path)
        if not path.is_file():
            raise SwarmdError(ERR_BAD_REQUEST, f"{path} is not a readable file")
        t = timeout or c.config.timeout
        last: SwarmdError | None = None
        for pk in await c._store_keys(STORES):
            try:
                peer = await c._peer(pk)
            except SwarmdError as e:
                last = e
                continue  # a store that went away: its record lingers until it expires
            return await push_file(
                peer, path, name, version, tags=tags, description=description, progress=progress, timeout=t
            )
        raise last or SwarmdError(ERR_UNAVAILABLE, "no store announces itself in the swarm")

    @translated
    async def get(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Metadata of name[:version] (latest when version is None) from any store holding it.

        Unversioned: the newest (swarmd.versions) of what every store holding it calls its
        latest, so a store that has not replicated a push yet does not decide."""
        if version is not None:
            _, meta = await self._find(name, version)
            return meta
        from swarmd.versions import version_key

        found: list[dict[str, Any]] = []
        try:
            async with contextlib.aclosing(self._holders(name, None)) as holders:
                async for _, meta in holders:
                    found.append(meta)
        except SwarmdError:
            if not found:
                raise
        return max(found, key=lambda m: version_key(str(m.get("version", ""))))

    async def _find(self, name: str, version: str | None) -> tuple[Any, dict[str, Any]]:
        async with contextlib.aclosing(self._holders(name, version)) as holders:
            async for found in holders:
                return found
        raise AssertionError("unreachable: _holders raises when no store holds the model")  # pragma: no cover

    async def _holders(self, name: str, version: str | None) -> Any:
        """(peer, metadata) of each store that holds name[:version], in turn: those announcing the
        model's topic, else every store. Raises (NOT_FOUND unless a store failed otherwise) when
        none does; the caller stops iterating once one served it."""
        c = self._client
        await c._ready()
        params = {"name": name} if version is None else {"name": name, "version": version}
        keys = await c._store_keys(model_topic(name)) or await c._store_keys(STORES)
        last: SwarmdError | None = None
        for pk in keys:
            try:
                peer = await c._peer(pk)
                meta = await peer.call("getModel", params, timeout=c.config.timeout)
            except SwarmdError as e:
                if not retryable(e):
                    raise
                last = e
                continue
            yield peer, meta
        if last is not None and last.code != ERR_NOT_FOUND:
            raise last
        raise SwarmdError(ERR_NOT_FOUND, f"no store holds model {name}{':' + version if version else ''}")

    @translated
    async def pull(
        self,
        name: str,
        version: str | None,
        path: str | Path,
        *,
        progress: Progress | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Download name[:version] (latest when None) to path (a directory: path/NAME-VERSION.onnx),
        verified against its sha256 and written atomically; resumes a partial dest + '.part'. A
        store whose copy fails (corrupt, gone, timed out) is replaced by the next that holds the
        same digest. Returns the metadata, with "path" where the file is."""
        c = self._client
        t = timeout or c.config.timeout
        chosen: dict[str, Any] | None = None
        dest: Path | None = None
        last: SwarmdError | None = None
        async with contextlib.aclosing(self._holders(name, version)) as holders:
            async for peer, meta in holders:
                if chosen is None:
                    chosen, dest = meta, pull_destination(path, meta["name"], meta["version"])
                elif meta.get("digest") != chosen["digest"]:
                    continue  # "latest" may differ between stores mid-replication: keep the first answer
                assert dest is not None
                try:
                    await pull_file(
                        peer, chosen["digest"], dest, size=chosen["size"], progress=progress, timeout=t
                    )
                except SwarmdError as e:
                    if not _next_store(e):
                        raise
                    last = e
                    continue
                return {**chosen, "path": str(dest)}
        raise last or SwarmdError(
            ERR_NOT_FOUND, f"no store holds model {name}{':' + version if version else ''}"
        )

    @translated
    async def rm(self, name: str, version: str) -> int:
        """Delete name:version on every store that holds it (versions go one at a time); returns how
        many stores deleted it. NotFound when none held it."""
        c = self._client
        await c._ready()
        if not version:
            raise SwarmdError(ERR_BAD_REQUEST, "rm needs a version (versions are deleted one at a time)")
        params = {"name": name, "version": version}
        keys = await c._store_keys(model_topic(name)) or await c._store_keys(STORES)
        deleted = 0
        for pk in keys:
            try:
                peer = await c._peer(pk)
                await peer.call("deleteModel", params, timeout=c.config.timeout)
                deleted += 1
            except SwarmdError as e:
                if not _next_store(e):
                    raise
        if not deleted:
            raise SwarmdError(ERR_NOT_FOUND, f"no store holds {name}:{version}")
        return deleted

    @translated
    async def list(self, name: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """Metadata of every version every reachable store holds, merged, sorted by name and version."""
        from swarmd.versions import version_key

        c = self._client
        await c._ready()
        params = {k: v for k, v in (("name", name), ("tag", tag)) if v is not None}
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        answered = 0
        last: SwarmdError | None = None
        for pk in await c._store_keys(STORES):
            try:
                peer = await c._peer(pk)
                ans = await peer.call("listModels", params, timeout=c.config.timeout)
            except SwarmdError as e:
                last = e
                continue
            answered += 1
            for m in ans.get("models", []) if isinstance(ans, dict) else []:
                seen.setdefault((m["name"], m["version"]), m)
        if not answered and last is not None:
            raise last
        return sorted(seen.values(), key=lambda m: (m["name"], version_key(m["version"])))


__all__ = ["Models", "pull_destination"]
