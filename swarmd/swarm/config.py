"""Settings of the swarm layer (the ``[swarm]`` TOML section)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SwarmConfig:
    """Tunables of topic membership and the connection pool.

    announce_addresses overrides what records advertise (e.g. a public IP
    behind a port forward); empty means the RPC server's bound address, or,
    when it is bound to a wildcard, the address the DHT sees us from.
    """

    secret: bytes | None = None  # private swarm: topics are HMACs of names with this secret
    announce_addresses: list[tuple[str, int]] = field(default_factory=list)  # HOST:PORT records advertise instead of the bound address
    announce_self: bool = True  # announce on peer_topic(own key) so we are reachable by key alone
    max_peers: int = 64  # automatic connections (lookups, inbound); explicit connect() may exceed it
    connect_timeout: float = 5.0  # seconds for one dial, handshake included
    request_timeout: float = 30.0  # default bound on request() when the caller gives none
    lookup_timeout: float = 5.0  # bound on one topic lookup, in seconds
    flush_timeout: float = 10.0  # flush() waits at most this long for the first announce and lookup
    leave_timeout: float = 2.0  # stop() withdraws every record at once, waiting at most this long
    record_ttl: float = 20 * 60.0  # seconds our topic records live
    reannounce_interval: float = 10 * 60.0  # seconds between re-announcements of a joined topic
    reannounce_jitter: float = 60.0  # random extra seconds per re-announcement
    # records joined with live=True (workers, stores, models they serve, orchestrators) say
    # "this node is up": they expire live_record_ttl after the last refresh, so a node killed
    # without withdrawing vanishes from lookups within that, and are refreshed every
    # live_reannounce_interval (+ up to live_reannounce_jitter): two refreshes per lifetime,
    # so one lost round does not drop a live node. Each refresh is one put to each of the k
    # holders (their tokens are reused), see docs/swarm.md for the traffic this costs.
    live_record_ttl: float = 12.0  # seconds a live record lives (a killed node is gone within this)
    live_reannounce_interval: float = 3.5  # seconds between refreshes of a live record
    live_reannounce_jitter: float = 0.5  # random extra seconds per refresh
    # a lookup round waits this long (at most) for its first new peer's dial before reading on,
    # so the first connection of a join is not slowed by the rest of the lookup; 0: never waits
    first_dial_lead: float = 0.05
    relookup_initial: float = 0.5  # first re-query of a joined topic; doubles up to relookup_interval
    relookup_interval: float = 60.0  # joined topics with lookup=True are re-queried this often
    reconnect_initial: float = 0.2  # first pause before re-dialling a wanted peer; doubles up to reconnect_max
    reconnect_max: float = 30.0  # longest pause between re-dials
    reconnect_attempts: int = 6  # re-dials of a lost wanted peer before giving up
    request_retries: int = 2  # topic-addressed requests try this many other peers after a failure
    event_queue: int = 256  # buffered connection events per subscriber; oldest dropped beyond
