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

    host: str = "0.0.0.0"
    port: int = 0
    bootstrap: list[tuple[str, int]] = field(default_factory=list)
    ksize: int = 20
    alpha: int = 3
    request_timeout: float = 1.0
    # "auto": probe reachability with STUN after bootstrap; "server"/"client" force it.
    mode: str = "auto"
    record_ttl: float = 20 * 60.0
    reannounce_interval: float = 10 * 60.0
    reannounce_jitter: float = 60.0
    # a record whose expiry lies further than this in the future is refused
    max_record_ttl: float = 30 * 60.0
    clock_skew: float = 60.0
    max_payload: int = 2048
    max_addresses: int = 8
    max_records_per_topic: int = 256
    max_records_per_source: int = 64
    max_records: int = 20_000
    max_datagram: int = 60_000
    reply_budget: int = 48_000  # record bytes in a topic_get reply to a sender holding our token
    unproven_budget: int = 1_200  # ... and to one without (bounds reflection amplification)
    token_rotation: float = 300.0
    # requests answered per source address per second (token bucket); floods beyond are dropped
    per_source_rate: float = 200.0
    per_source_burst: float = 400.0
    # ... and per source IP across its ports (a flood rotating source ports); loopback is exempt,
    # since a box running many local nodes talks to them all from 127.0.0.1
    per_ip_rate: float = 2000.0
    per_ip_burst: float = 4000.0
    max_sources_tracked: int = 4096
    # routing-table contacts sharing one IP (ids are claimed, not proven: one host must not fill
    # the buckets with made-up ids); loopback exempt like per_ip_rate; 0 turns the cap off
    max_contacts_per_ip: int = 8
    refresh_interval: float = 15 * 60.0
    # a contact silent this long is pinged when we hand it out in a reply (at most once per
    # period, within a global budget); one that times out is evicted and not taken back from others' replies for
    # dead_contact_memory unless it talks to us first
    contact_check_after: float = 10.0  # 0: never check
    contact_checks_per_s: float = 1.0  # ... and at most this many such pings per second (burst 4)
    dead_contact_memory: float = 120.0
    lookup_timeout: float = 5.0
    # how long start() keeps retrying bootstrap nodes that do not answer (backoff from
    # bootstrap_backoff doubling to bootstrap_backoff_max); 0: one round (short-lived tools),
    # inf: until one answers (a daemon sets it from node.bootstrap_wait)
    bootstrap_wait: float = 0.0
    bootstrap_backoff: float = 0.5
    bootstrap_backoff_max: float = 10.0

    def validate(self) -> None:
        from swarmd.errors import ConfigError

        if self.mode not in ("auto", "server", "client"):
            raise ConfigError(f"dht.mode must be auto, server or client, got {self.mode!r}")
        if not 0 < self.request_timeout <= 30:
            raise ConfigError(f"dht.request_timeout must be in (0, 30] seconds, got {self.request_timeout}")
        if self.ksize < 2 or self.alpha < 1:
            raise ConfigError("dht.ksize must be >= 2 and dht.alpha >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"dht.port must be 0..65535, got {self.port}")
