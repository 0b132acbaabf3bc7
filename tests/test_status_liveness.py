"""`swarmd status` tells liveness: each worker's last-seen age (from its record's time-based
seq) and whether an orchestrator ejected it (from the orchestrators' own records)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from swarmd.commands.status import ejections, last_seen, print_status
from swarmd.topics import ORCHESTRATORS


class Records:
    """What swarmd_rpc.Client.lookup answers, for the topics status asks about."""

    def __init__(self, by_topic: dict[str, list[SimpleNamespace]]) -> None:
        self.by_topic = by_topic

    async def lookup(self, topic: str) -> list[SimpleNamespace]:
        return self.by_topic.get(topic, [])


async def test_ejections_map_worker_prefixes_to_the_orchestrators_that_ejected_them():
    w1, w2 = "ab" * 32, "cd" * 32
    o1, o2 = bytes.fromhex("11" * 32), bytes.fromhex("22" * 32)
    swarm = Records({ORCHESTRATORS: [
        SimpleNamespace(public_key=o1, payload={"ejected": [w1[:16]]}),
        SimpleNamespace(public_key=o2, payload={"ejected": [w1[:16], w2[:16], 7, None]}),  # junk ignored
        SimpleNamespace(public_key=o2, payload="not a map"),
    ]})
    got = await ejections(swarm)
    assert got == {w1[:16]: ["11" * 8, "22" * 8], w2[:16]: ["22" * 8]}


def test_last_seen_reads_the_signing_time_from_a_time_based_seq():
    now = time.time()
    assert last_seen(int((now - 3.0) * 1000), now) == 3.0
    assert last_seen(int((now + 1.0) * 1000), now) == 0.0  # a clock ahead of ours: seen just now
    assert last_seen(42, now) is None  # not a time: no age to tell


def test_status_prints_age_and_ejection(capsys):
    st = {"public_key": "ee" * 32, "roles": ["bootstrap"], "ports": {"rpc": 1}, "workers": [
        {"public_key": "ab" * 32, "state": "ONLINE", "load": {}, "models": ["m"], "last_seen_s": 2.5,
         "ejected_by": ["11" * 8]},
        {"public_key": "cd" * 32, "state": "ONLINE", "load": {}, "models": [], "last_seen_s": None,
         "ejected_by": []},
    ], "models": [], "errors": {}}
    print_status(st)
    out = capsys.readouterr().out
    assert "abababababababab  EJECTED  seen 2.5s ago" in out
    assert "cdcdcdcdcdcdcdcd  ONLINE   seen ? ago" in out
