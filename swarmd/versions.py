"""The one order of model versions, used by every place that picks one.

Stores pick "latest" with it, workers serve an unversioned request with it,
gateways, orchestrators, the client library and the CLI list versions in it.
The order itself (release numbers compared as numbers, pre-releases below their
release, unnumbered versions below every numbered one, ties by text, so it is
total and the same on every node) is spelled out in docs/store.md; `next_version`
gives a push without a version one more than the highest major number the name
ever had, which is therefore always the new latest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_RELEASE = re.compile(r"^[vV]?(\d+(?:\.\d+)*)")

Key = tuple[int, tuple[int, ...], int, tuple[tuple[int, int, str], ...], str]


def _tag_key(tag: str) -> tuple[tuple[int, int, str], ...]:
    parts = [p for p in re.split(r"[.\-_]", tag) if p]
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def version_key(version: str) -> Key:
    """Sort key of a version: larger means newer (see the module docstring)."""
    m = _RELEASE.match(version)
    if m is None:
        return (0, (), 0, (), version)
    release = [int(p) for p in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    rest = version[m.end():]
    if not rest or rest.startswith("+"):
        return (1, tuple(release), 1, (), version)
    return (1, tuple(release), 0, _tag_key(rest.split("+", 1)[0]), version)


def latest(versions: Iterable[str]) -> str | None:
    """The newest of versions by version_key; None when there is none."""
    return max(versions, key=version_key, default=None)


def sort_versions(versions: Iterable[str]) -> list[str]:
    """Oldest first."""
    return sorted(versions, key=version_key)


def next_version(used: Iterable[str]) -> str:
    """The version a push without one takes: above every major number used (deleted ones too)."""
    majors = [version_key(v)[1][0] for v in used if version_key(v)[0]]
    return str(max(majors, default=0) + 1)


__all__ = ["latest", "next_version", "sort_versions", "version_key"]
