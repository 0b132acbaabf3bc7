"""Well-known topic names. A topic on the DHT is a 32-byte hash of one of
these names (an HMAC of it in a private swarm), so every role finds the
others with no configuration.
"""

from __future__ import annotations

STORES = "swarmd/stores"  # every store; payload: {"models": count, "bytes": used}
WORKERS = "swarmd/workers"  # every worker; payload: {"state", "load", "models": [names]}
ORCHESTRATORS = "swarmd/orchestrators"
GATEWAYS = "swarmd/gateways"
RELAYS = "swarmd/relays"
RACKS = "swarmd/racks"


def model_topic(name: str) -> str:
    """Stores holding any version of model `name` announce here."""
    return f"swarmd/model/{name}"


def blob_topic(digest: str) -> str:
    """Stores holding the blob with this sha256 hex digest announce here."""
    return f"swarmd/blob/{digest}"


def worker_model_topic(name: str) -> str:
    """Workers serving model `name` announce here with state and live load."""
    return f"swarmd/workers/{name}"


def peer_topic(public_key_hex: str) -> str:
    """Every node announces here, so a peer is found by its public key alone
    (`swarmd call PUBKEY METHOD`, `swarm.connect(public_key)` with no record)."""
    return f"swarmd/peer/{public_key_hex.lower()}"


# The role a peer announcing on a well-known topic must hold (swarmd.node.trust):
# the swarm's lookups return only announcers admitted to it, so everything
# that finds peers through these topics — routing, model fetch, replication,
# relays — consumes admitted candidates only.
ROLE_TOPICS = {
    WORKERS: "worker",
    STORES: "store",
    ORCHESTRATORS: "orchestrator",
    GATEWAYS: "gateway",
    RELAYS: "relay",
}
_ROLE_OF_PREFIX = (
    ("swarmd/workers/", "worker"),
    ("swarmd/model/", "store"),
    ("swarmd/blob/", "store"),
)


def topic_role(name: str) -> str | None:
    """The role announcers of topic `name` must be admitted to, or None (any peer)."""
    role = ROLE_TOPICS.get(name)
    if role is not None:
        return role
    for prefix, r in _ROLE_OF_PREFIX:
        if name.startswith(prefix):
            return r
    return None
