"""[store] settings: limits and replication knobs for the model store role."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoreConfig:
    """[store]: how much a store accepts and how hard it works to keep copies alive."""

    max_model_bytes: int = 2 * 1024**3  # larger uploads are refused up front (ERR_TOO_LARGE)
    replication_factor: int = 2  # live stores that should hold each blob
    chunk_bytes: int = 1 << 20  # file read per send of a download (read and hashed in a thread, ahead)
    incoming_ttl: float = 24 * 3600.0  # partial uploads untouched this long are dropped at gc
    replicate_interval: float = 10.0  # seconds between replication rounds
    scrub_per_round: int = 1  # blobs re-hashed each round, so rot in unread blobs is found and repaired
    max_parallel_pulls: int = 2  # blobs a store pulls from peers at once
    peers: list[str] = field(default_factory=list)  # HEXKEY@HOST:PORT stores to replicate with besides the swarm's
    transfer_timeout: float = 30.0  # bound on each network step of a transfer (per chunk, per call)
    max_downloads_per_peer: int = 4  # downloadBlob streams one caller key may run at once (ERR_OVERLOADED beyond)
    max_downloads: int = 32  # downloadBlob streams served at once in total: each holds up to two chunks

    def validate(self) -> None:
        """Refuse values that would make the store useless or unbounded, naming the key."""
        from swarmd.errors import ConfigError

        refuse_if = ConfigError.refuse_if
        refuse_if(self, "store", "max_model_bytes chunk_bytes incoming_ttl replicate_interval max_parallel_pulls "
                  "transfer_timeout max_downloads_per_peer max_downloads", lambda v: v <= 0, "be positive")
        refuse_if(self, "store", "replication_factor", lambda v: v < 1, "be at least 1")
        refuse_if(self, "store", "scrub_per_round", lambda v: v < 0, "be 0 or more")
        refuse_if(self, "store", "chunk_bytes", lambda v: v > 16 << 20, "be at most 16 MiB")
