"""Replication planning and catalog merging, as pure functions.

Every store runs the same planner over the same view (who is alive, who holds
which blob) and executes only the pulls addressed to itself. Targets and
sources are chosen by rendezvous hashing, so stores agree on who copies what
without talking about it, and the load of serving copies spreads over holders.
A view that differs between stores only causes a spare copy, never a loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from swarmd.names import ModelMeta


@dataclass(frozen=True, order=True)
class Pull:
    """`store` should fetch blob `digest` from `source`."""

    store: str
    digest: str
    source: str


def _score(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def plan_replication(
    holdings: Mapping[str, Collection[str]],
    live: Collection[str],
    factor: int,
    wanted: Mapping[str, Collection[str]] | None = None,
    refused: Mapping[str, Collection[str]] | None = None,
) -> list[Pull]:
    """Pulls that bring every held blob to `factor` live holders.

    holdings: store key -> digests it holds (on disk, verified, of a live model).
    live: stores currently reachable; holdings of others do not count.
    wanted: store key -> digests whose metadata it has but whose blob it lost
        (corruption, disk loss); those stores pull first, whatever the factor.
    refused: store key -> digests it must not be given (it deleted them).
    A blob no live store holds cannot be planned and is left out.
    """
    live_set = set(live)
    wanted = wanted or {}
    refused = refused or {}
    held_by: dict[str, set[str]] = {}
    for store, digests in holdings.items():
        if store in live_set:
            for d in digests:
                held_by.setdefault(d, set()).add(store)
    target_count = max(0, min(factor, len(live_set)))
    pulls: list[Pull] = []
    for digest in sorted(held_by):
        holders = held_by[digest]
        targets = sorted(s for s in live_set if digest in wanted.get(s, ()) and s not in holders)
        need = target_count - len(holders) - len(targets)
        if need > 0:
            candidates = sorted(
                (s for s in live_set if s not in holders and s not in targets and digest not in refused.get(s, ())),
                key=lambda s: _score(digest, s),
            )
            targets += candidates[:need]
        for t in targets:
            source = min(holders, key=lambda h, t=t: _score(digest, t, h))
            pulls.append(Pull(t, digest, source))
    return pulls


MAX_CLOCK_SKEW = 300.0  # seconds a peer's clock may run ahead of ours; rows stamped later are refused


def from_the_future(row: ModelMeta, now: float) -> bool:
    """Stamped later than any honest clock could be: a remote clock is never taken on its word."""
    limit = now + MAX_CLOCK_SKEW
    return row.updated > limit or row.created > limit or (row.deleted is not None and row.deleted > limit)


def rows_to_adopt(
    local: Callable[[str, str], ModelMeta | None], remote: Iterable[ModelMeta], now: float
) -> tuple[list[ModelMeta], list[ModelMeta]]:
    """Remote tombstones that delete our rows: (to adopt, deletions of rows we do not hold).

    A deletion adopts only over a live row we hold for the same digest and only
    when it is newer (last writer wins on `updated`), and never when it is stamped
    in the future (a peer cannot win every merge by its clock). A tombstone for a
    row we do not hold is never written (a peer could fill our catalog with
    permanent rows); it is returned apart so the caller can refuse a later copy
    of that row from a store that has not heard of the deletion yet. A remote
    row naming other bytes than ours is never adopted. Live rows are not adopted
    here: they arrive with their blob, through a pull.
    """
    adopt: list[ModelMeta] = []
    unheld: list[ModelMeta] = []
    for r in remote:
        if r.deleted is None or from_the_future(r, now):
            continue
        mine = local(r.name, r.version)
        if mine is None:
            unheld.append(r)
        elif mine.digest == r.digest and mine.deleted is None and r.updated > mine.updated:
            adopt.append(r)
    return adopt, unheld
