"""Replication between stores: keep every blob at `replication_factor` live stores.

Each round asks every trusted store (static peers and those announcing STORES)
for its state (`storeState`: the blobs it has, wants and refuses, and one page
of catalog changes after our cursor), adopts deletions made elsewhere, runs the
pure planner (`swarmd.store.replication.plan_replication`) and pulls the blobs
the plan addresses to us. Everything a peer sends is type-checked and bounded
here. `Replication` is a mixin of `StoreRole`; the state lives there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarmd.errors import (
    ERR_BAD_REQUEST,
    ERR_CONFLICT,
    SwarmdError,
)
from swarmd.names import ModelMeta, check_digest, check_record
from swarmd.node.supervisor import Supervisor
from swarmd.roles.base import NodeContext
from swarmd.settings import parse_peer
from swarmd.store.catalog import now
from swarmd.store.core import ModelStore, PushRequest
from swarmd.store.replication import Pull, from_the_future, plan_replication, rows_to_adopt
from swarmd.store.transfer import pull_stream
from swarmd.topics import STORES

MAX_STATE_ROWS = 100_000  # bound on a peer's digest lists we are willing to read
PAGE_ROWS = 2_000  # catalog changes one storeState answer carries (and we take from one peer per round)
MAX_ROUND_ROWS = 20_000  # catalog changes taken from all peers in one round; the rest wait for the next
MAX_ROWS_PER_BLOB = 64  # name:version rows a replica pull may publish for one blob
MAX_EAGER_ROUNDS = 8  # rounds run back to back while peers have more changes, before the interval again
MAX_UNHELD_DELETIONS = 10_000  # remembered deletions of rows we do not hold (in memory, oldest dropped)


def meta_from_wire(obj: Any) -> ModelMeta:
    """A catalog row from a peer, type-checked field by field (swarmd.names.check_record)."""
    m = check_record(obj)
    if obj.get("created") is None or obj.get("updated") is None:
        raise SwarmdError(ERR_BAD_REQUEST, "a catalog row from a peer needs its created and updated times")
    if m.format != "onnx":
        raise SwarmdError(ERR_BAD_REQUEST, f"catalog row has format {m.format!r}; stores hold onnx only")
    return m


@dataclass
class PeerState:
    """What one store told us about itself in a replication round.

    models: the catalog changes after our cursor for it (one page), not its catalog.
    """

    key: str
    have: set[str]
    missing: set[str]
    refused: set[str]
    models: list[ModelMeta]
    cursor: int = 0
    head: int = 0
    more: bool = False
    dropped: int = field(default=0)
    since: int = 0


def parse_state(key: str, obj: Any, since: int) -> PeerState:
    """A peer's storeState answer, type-checked (run in a thread: it can be thousands of rows)."""
    if not isinstance(obj, dict):
        raise SwarmdError(ERR_BAD_REQUEST, "storeState answer must be a map")
    sets = {}
    for name in ("have", "missing", "refused"):
        v = obj.get(name, [])
        if not isinstance(v, list) or len(v) > MAX_STATE_ROWS:
            raise SwarmdError(ERR_BAD_REQUEST, f"storeState.{name} must be a list of at most {MAX_STATE_ROWS}")
        sets[name] = {check_digest(d) for d in v}
    rows = obj.get("models", [])
    if not isinstance(rows, list) or len(rows) > PAGE_ROWS:
        raise SwarmdError(ERR_BAD_REQUEST, f"storeState.models must be a list of at most {PAGE_ROWS} rows")
    cursor, head = obj.get("cursor", 0), obj.get("head", 0)
    for v in (cursor, head):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SwarmdError(ERR_BAD_REQUEST, "storeState cursor and head must be non-negative integers")
    if rows and cursor <= since:
        raise SwarmdError(ERR_BAD_REQUEST, "storeState sent changes without moving its cursor")
    t = now()
    models, dropped = [], 0
    for r in rows:
        m = meta_from_wire(r)
        if from_the_future(m, t):
            dropped += 1
            continue
        models.append(m)
    return PeerState(key, sets["have"], sets["missing"], sets["refused"], models, cursor, head,
                     bool(obj.get("more")), dropped, since)


class Replication:
    """The replication loop of a store role and its peer set."""

    ctx: NodeContext
    config: Any
    key: str
    log: Any
    _wake: asyncio.Event
    _round_done: asyncio.Event
    rounds: int
    pulled: int
    tasks: Supervisor  # the role's scope (roles.base.Role.tasks): closed on stop
    _peers: dict[str, Any]
    _records: dict[str, Any]
    _unreachable: set[str]
    _untrusted: set[str]
    _cursors: dict[str, int]
    _more: bool
    _more_rounds: int
    _deleted_elsewhere: OrderedDict[tuple[str, str, str], float]
    _full_round: bool
    _static_peers: list[tuple[str, str, int]]

    if TYPE_CHECKING:  # provided by StoreRole

        @property
        def core(self) -> ModelStore: ...

        async def _announce(self) -> None: ...

    def set_static_peers(self, entries: list[str]) -> None:
        """Replace the HEXKEY@HOST:PORT stores replicated with besides the swarm's; starts a round."""
        self._static_peers = [self._parse_peer(p) for p in entries]
        self._wake.set()

    @staticmethod
    def _parse_peer(text: str) -> tuple[str, str, int]:
        key, host, port = parse_peer(text, what="store.peers entry")
        return key.hex(), host, port

    def start_replication(self) -> None:
        """Run the replication loop (in the role's task scope; stop() closes it)."""
        self.tasks.spawn(self._replicate_loop(), name="store-replication")

    async def _peer_keys(self) -> list[str]:
        """The stores we replicate with: static peers, and those announcing STORES that we trust.

        The one place the peer set is decided (NodeContext.trusts): a key that may not
        write to us gets no say in our catalog by answering storeState either.
        """
        keys = {k for k, _, _ in self._static_peers}  # named by the operator: trusted
        swarm = self.ctx.swarm
        if swarm is not None:
            self._records = {}
            for rec in await swarm.lookup_all(STORES):
                if self.ctx.trusts(rec.public_key, "store", rec, replica=True):
                    self._records[rec.public_key.hex()] = rec
                elif rec.public_key.hex() not in self._untrusted:
                    self._untrusted.add(rec.public_key.hex())
                    self.log.bind(event="replica_refused", peer=rec.public_key.hex()[:16]).warning(
                        "not replicating with store {}: it is not a trusted store of this swarm",
                        rec.public_key.hex()[:16])
            keys |= set(self._records)
        keys.discard(self.key)
        return sorted(keys)

    async def _call(self, key: str, method: str, params: Any, timeout: float) -> Any:
        peer = await self._connect(key)
        return await peer.call(method, params, timeout=timeout)

    async def _connect(self, key: str) -> Any:
        """An RPC connection to store `key`: a static peer's own, or the swarm's pooled one."""
        for k, host, port in self._static_peers:
            if k == key:
                peer = self._peers.get(key)
                if peer is None or peer.is_closed:
                    from swarmd.rpc import connect

                    peer = await connect(self.ctx.identity, host, port, remote_public_key=bytes.fromhex(key),
                                         timeout=self.config.transfer_timeout)
                    self._peers[key] = peer
                return peer
        swarm = self.ctx.swarm
        if swarm is not None:
            async with asyncio.timeout(self.config.transfer_timeout):
                return await swarm.connect(bytes.fromhex(key), self._records.get(key))
        raise SwarmdError(ERR_BAD_REQUEST, f"no way to reach store {key[:16]}")

    async def _replicate_loop(self) -> None:
        self._peers = {}
        timed = False  # woken rounds (upload, delete, corruption) skip the scrub: it competes with transfers
        try:
            while True:
                timed, self._full_round = timed or self._full_round, False
                try:
                    if timed and await asyncio.to_thread(self.core.scrub, self.config.scrub_per_round):
                        self._wake.set()  # something rotted: the next round re-fetches it at once
                    await self._announce()
                    await self.replicate_once()
                    await self._announce()
                    await asyncio.to_thread(self.core.gc)
                except SwarmdError as e:
                    self.log.bind(event="replication_failed", code=e.code).warning("replication round: {}", e.message)
                except (OSError, TimeoutError) as e:  # a bad round must not take the store down; the next one retries
                    self.log.bind(event="replication_failed", error=type(e).__name__).warning(
                        "replication round failed: {!r}", e
                    )
                self.rounds += 1
                self._round_done.set()
                self._wake.clear()
                # a peer has more changes than one round takes: go on at once, a few rounds in a
                # row at most (a peer that always has more must not keep this loop spinning)
                self._more_rounds = self._more_rounds + 1 if self._more else 0
                if self._more and self._more_rounds <= MAX_EAGER_ROUNDS:
                    self._wake.set()
                self._more = False
                interval = self.config.replicate_interval * (0.8 + 0.4 * random.random())
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as
                # the wake-up does, and the loop would outlive stop()
                timed = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
                        timed = False
        finally:
            peers, self._peers = self._peers, {}
            for peer in peers.values():
                with contextlib.suppress(Exception):
                    await peer.close()

    async def wait_round(self) -> None:
        """Run a full round now (scrub included) and wait for it to finish (tests, operators)."""
        self._full_round = True
        self._round_done.clear()
        self._wake.set()
        await self._round_done.wait()

    async def _state_of(self, key: str, budget: int) -> PeerState | None:
        since = self._cursors.get(key, 0)
        try:
            obj = await self._call(key, "storeState", {"since": since, "limit": max(1, min(budget, PAGE_ROWS))},
                                   self.config.transfer_timeout)
            state = await asyncio.to_thread(parse_state, key, obj, since)
        except (SwarmdError, OSError, TimeoutError) as e:
            self._peers.pop(key, None)
            if key not in self._unreachable:  # one line per change, not one per round: a dead
                self._unreachable.add(key)  # store's record lingers on STORES until it expires
                self.log.bind(event="store_unreachable", peer=key[:16]).info("store {} unreachable: {}", key[:16], e)
            return None
        if key in self._unreachable:
            self._unreachable.discard(key)
            self.log.bind(event="store_reachable", peer=key[:16]).info("store {} reachable again", key[:16])
        if state.dropped:
            self.log.bind(event="rows_refused", peer=key[:16], count=state.dropped).warning(
                "refused {} catalog rows from store {} stamped in the future", state.dropped, key[:16])
        return state

    async def replicate_once(self) -> list[Pull]:
        """One round: learn peers' state and catalog changes, adopt their deletions, pull what the plan gives us."""
        core = self.core
        keys = await self._peer_keys()
        random.shuffle(keys)  # the round's row budget goes to different peers first each round
        budget = MAX_ROUND_ROWS
        states: list[PeerState] = []
        for batch in [keys[i:i + 8] for i in range(0, len(keys), 8)]:
            share = max(1, min(PAGE_ROWS, budget // max(1, len(batch))))
            got = await asyncio.gather(*(self._state_of(k, share) for k in batch))
            for st in got:
                if st is not None:
                    states.append(st)
                    budget -= len(st.models)
        adopted: list[ModelMeta] = []
        t = now()
        for st in states:
            adopt, unheld = await asyncio.to_thread(rows_to_adopt, core.catalog.row, st.models, t)
            for r in unheld:
                self._deleted_elsewhere[(r.name, r.version, r.digest)] = r.updated
                self._deleted_elsewhere.move_to_end((r.name, r.version, r.digest))
            while len(self._deleted_elsewhere) > MAX_UNHELD_DELETIONS:
                self._deleted_elsewhere.popitem(last=False)
            if adopt:
                adopted += await asyncio.to_thread(core.apply_tombstones, adopt)
            # a head behind our cursor: the peer lost its catalog (or a new one has its key): start over
            self._cursors[st.key] = st.cursor if st.head >= st.since else 0
            self._more = self._more or st.more or st.head < st.since  # the next round comes at once
        if adopted:
            self.log.bind(event="deletions_adopted", count=len(adopted)).info(
                "adopted {} deletions made on other stores", len(adopted)
            )
        refused = await asyncio.to_thread(core.catalog.tombstoned_digests)
        mine = PeerState(self.key, core.holdings(), core.missing(), refused, [])
        every = [mine, *states]
        plan = plan_replication(
            {s.key: s.have for s in every}, [s.key for s in every], self.config.replication_factor,
            wanted={s.key: s.missing for s in every}, refused={s.key: s.refused for s in every},
        )
        todo = [p for p in plan if p.store == self.key]
        by_key = {s.key: s for s in states}
        sem = asyncio.Semaphore(max(1, self.config.max_parallel_pulls))

        async def run(p: Pull) -> bool:
            async with sem:
                return await self._pull(p, by_key[p.source])

        results = await asyncio.gather(*(run(p) for p in todo))
        return [p for p, ok in zip(todo, results, strict=True) if ok]

    async def _rows_for(self, source: str, digest: str) -> list[ModelMeta]:
        """The source's live rows for one blob, checked: not from the future, not deleted elsewhere, capped."""
        ans = await self._call(source, "listModels", {"digest": digest, "include_deleted": True},
                               self.config.transfer_timeout)
        rows = ans.get("models") if isinstance(ans, dict) else None
        if not isinstance(rows, list):
            raise SwarmdError(ERR_BAD_REQUEST, "listModels answer must hold a models list")

        def parse() -> list[ModelMeta]:
            t = now()
            out = []
            for r in rows[:MAX_ROWS_PER_BLOB * 4]:
                m = meta_from_wire(r)
                if m.digest != digest or m.deleted is not None or from_the_future(m, t):
                    continue
                gone = self._deleted_elsewhere.get((m.name, m.version, m.digest))
                if gone is not None and gone >= m.updated:
                    continue
                out.append(m)
            return out[:MAX_ROWS_PER_BLOB]

        return await asyncio.to_thread(parse)

    async def _pull(self, p: Pull, source: PeerState) -> bool:
        log = self.log.bind(event="replica_pull", digest=p.digest, source=p.source[:16])
        try:
            rows = await self._rows_for(p.source, p.digest)
        except (SwarmdError, OSError, TimeoutError) as e:
            log.warning("cannot list the rows of {} on {}: {}", p.digest[:16], p.source[:16], e)
            return False
        if not rows:
            return False
        core = self.core
        first = rows[0]
        try:
            up = await asyncio.to_thread(core.begin, PushRequest(first.name, p.digest, first.size, first.version))
        except SwarmdError as e:
            if e.code != ERR_CONFLICT:
                log.warning("cannot pull {}: {}", p.digest[:16], e.message)
            return False
        try:
            if not up.have_blob:
                peer = await self._connect(p.source)
                await pull_stream(peer, p.digest, up.offset, up.write_many, size=first.size,
                                  timeout=self.config.transfer_timeout)
            taken = await asyncio.to_thread(core.complete_replica, up, rows)
        except (SwarmdError, OSError, TimeoutError) as e:
            log.warning("pull of {} from {} failed: {}", p.digest[:16], p.source[:16], e)
            return False
        finally:
            up.close()
        self.pulled += bool(taken)
        return bool(taken)
