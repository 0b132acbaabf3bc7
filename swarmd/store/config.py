"""[store] settings: limits and replication knobs for the model store role."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StoreConfig:
    """[store]: how much a store accepts and how hard it works to keep copies alive."""

    max_model_bytes: int = 2 * 1024**3  # larger uploads are refused up front (ERR_TOO_LARGE)
    replication_factor: int = 2  # live stores that should hold each blob
    chunk_bytes: int = 256 * 1024  # stream chunk size for uploads and downloads
    incoming_ttl: float = 24 * 3600.0  # partial uploads untouched this long are dropped at gc
    replicate_interval: float = 10.0  # seconds between replication rounds
    scrub_per_round: int = 1  # blobs re-hashed each round, so rot in unread blobs is found and repaired
    max_parallel_pulls: int = 2  # blobs a store pulls from peers at once
    peers: list[str] = field(default_factory=list)  # HEXKEY@HOST:PORT stores to replicate with besides the swarm's
    transfer_timeout: float = 30.0  # bound on each network step of a transfer (per chunk, per call)
