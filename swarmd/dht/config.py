"""Settings of a DHT node. The integrator composes this into the layered
config as the ``[dht]`` TOML section; tests shrink the timers to seconds."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DhtConfig:
    """Tunables of one DHT node.

    Timers default to the values the design rests on (records live ~20 min and
    are re-announced every ~10 min); the request timeout is short because a
    healthy UDP round trip is sub-millisecond on a LAN and tens of ms across
    the internet, and kademlia's 5 s makes every dead contact cost 5 s.
    """

    host: str = "0.0.0.0"  # UDP bind address (a node sets node.host)
    port: int = 0  # UDP port (a node sets node.dht_port); 0: any free port
    bootstrap: list[tuple[str, int]] = field(default_factory=list)  # (HOST, PORT) of nodes to join (a node sets node.bootstrap)
    ksize: int = 20  # contacts per bucket and nodes a record is stored on (Kademlia k)
    alpha: int = 3  # requests in flight per lookup (Kademlia alpha)
    request_timeout: float = 1.0  # seconds before an unanswered DHT request counts as lost
    # "auto": probe reachability with STUN after bootstrap; "server"/"client" force it.
    mode: str = "auto"
    record_ttl: float = 20 * 60.0  # seconds our records live on other nodes
    reannounce_interval: float = 10 * 60.0  # seconds between re-announcements of a record
    reannounce_jitter: float = 60.0  # random extra seconds per re-announcement (no thundering herd)
    # a record whose expiry lies further than this in the future is refused
    max_record_ttl: float = 30 * 60.0
    clock_skew: float = 60.0  # seconds a record may claim to be from the future
    max_payload: int = 2048  # bytes of payload per record
    max_addresses: int = 8  # addresses per record
    max_records_per_topic: int = 256  # records held for one topic
    max_records_per_source: int = 64  # records held from one source address
    max_records: int = 20_000  # records held in all
    max_datagram: int = 60_000  # largest UDP datagram read or sent
    reply_budget: int = 48_000  # record bytes in a topic_get reply to a sender holding our token
    unproven_budget: int = 1_200  # ... and to one without (bounds reflection amplification)
    token_rotation: float = 300.0  # seconds between rotations of the store-token secret
    # requests answered per source address per second (token bucket); floods beyond are dropped
    per_source_rate: float = 200.0
    per_source_burst: float = 400.0  # bucket size of per_source_rate
    # ... and per source IP across its ports (a flood rotating source ports); loopback is exempt,
    # since a box running many local nodes talks to them all from 127.0.0.1
    per_ip_rate: float = 2000.0
    per_ip_burst: float = 4000.0  # bucket size of per_ip_rate
    max_sources_tracked: int = 4096  # rate-limit buckets kept (least recently used dropped)
    # routing-table contacts sharing one IP (ids are claimed, not proven: one host must not fill
    # the buckets with made-up ids); loopback exempt like per_ip_rate; 0 turns the cap off
    max_contacts_per_ip: int = 8
    refresh_interval: float = 15 * 60.0  # seconds between refreshes of idle routing-table buckets
    # a contact silent this long is pinged when we hand it out in a reply (at most once per
    # period, within a global budget); one that times out is evicted and not taken back from others' replies for
    # dead_contact_memory unless it talks to us first
    contact_check_after: float = 10.0  # 0: never check
    contact_checks_per_s: float = 1.0  # ... and at most this many such pings per second (burst 4)
    dead_contact_memory: float = 120.0  # seconds a timed-out contact is not taken back from replies
    # a second UDP port that answers STUN only (RFC 5780 style: one DHT node lets a client
    # tell cone from symmetric NAT); 0 = any free port, -1 = off
    stun_alt_port: int = 0
    lookup_timeout: float = 5.0  # bound on one lookup, in seconds
    # how long start() keeps retrying bootstrap nodes that do not answer (backoff from
    # bootstrap_backoff doubling to bootstrap_backoff_max); 0: one round (short-lived tools),
    # inf: until one answers (a daemon sets it from node.bootstrap_wait)
    bootstrap_wait: float = 0.0  # seconds start() retries silent bootstrap nodes (see above)
    bootstrap_backoff: float = 0.5  # first pause between bootstrap tries, doubling
    bootstrap_backoff_max: float = 10.0  # longest pause between bootstrap tries

    def validate(self) -> None:
        from swarmd.errors import ConfigError

        if self.mode not in ("auto", "server", "client"):
            raise ConfigError(f"dht.mode must be auto, server or client, got {self.mode!r}")
        ConfigError.refuse_if(self, "dht", "request_timeout", lambda v: not 0 < v <= 30, "be in (0, 30] seconds")
        if self.ksize < 2 or self.alpha < 1:
            raise ConfigError("dht.ksize must be >= 2 and dht.alpha >= 1")
        ConfigError.refuse_if(self, "dht", "port", lambda v: not 0 <= v <= 65535, "be 0..65535")
        ConfigError.refuse_if(self, "dht", "stun_alt_port", lambda v: not -1 <= v <= 65535,
                              "be -1 (off), 0 (any free port) or a port")
