"""The Supervisor's scopes: crash policies, closing cascades, and the tree `swarmd status` shows."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from swarmd.commands.status import gather_status, print_status
from swarmd.daemon import Node
from swarmd.node.supervisor import LOG, STOP_NODE, Supervisor
from swarmd.settings import Settings


async def test_a_crash_stops_the_node_or_is_logged_by_its_scope_policy() -> None:
    crashes: list[tuple[str, str]] = []
    root = Supervisor(lambda name, exc: crashes.append((name, repr(exc))))
    vital = root.scope("fleet", STOP_NODE)
    chatty = root.scope("swarm", LOG)
    reported: list[str] = []
    quiet = root.scope("dht", LOG, report=lambda where, exc: reported.append(where))

    async def boom() -> None:
        raise RuntimeError("boom")

    for scope, name in ((chatty, "swarm-dial"), (quiet, "dht-ping"), (vital, "fleet-health")):
        t = scope.spawn(boom(), name)
        await asyncio.gather(t, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run
    assert crashes == [("node/fleet/fleet-health", "RuntimeError('boom')")]  # only the STOP_NODE scope's
    assert reported == ["node/dht/dht-ping"]
    await root.close()


async def test_closing_a_scope_cancels_its_tasks_and_its_children_only() -> None:
    root = Supervisor()
    role = root.scope("role:orchestrator")
    fleet = role.scope("fleet")
    other = root.scope("swarm", LOG)
    forever = asyncio.Event()
    tasks = [fleet.spawn(forever.wait(), "fleet-health"), role.spawn(forever.wait(), "orchestrator-announce"),
             other.spawn(forever.wait(), "swarm-topic-ab")]
    await asyncio.sleep(0)
    assert root.describe() == {
        "name": "node", "policy": "stop-node", "tasks": [],
        "scopes": [
            {"name": "role:orchestrator", "policy": "stop-node", "tasks": ["orchestrator-announce"],
             "scopes": [{"name": "fleet", "policy": "stop-node", "tasks": ["fleet-health"], "scopes": []}]},
            {"name": "swarm", "policy": "log", "tasks": ["swarm-topic-ab"], "scopes": []},
        ],
    }
    await role.close()
    assert tasks[0].cancelled() and tasks[1].cancelled() and not tasks[2].done()
    assert [s["name"] for s in root.describe()["scopes"]] == ["swarm"] and len(root) == 1
    # a part that starts again uses its scope again, and shows again
    again = role.spawn(forever.wait(), "orchestrator-announce")
    assert [s["name"] for s in root.describe()["scopes"]] == ["swarm", "role:orchestrator"]
    await root.close()
    assert again.cancelled() and tasks[2].cancelled() and len(root) == 0


async def test_swarmd_status_names_every_scope_and_task(tmp_path: Path, capsys: Any) -> None:
    s = Settings()
    s.node.roles = ["bootstrap", "orchestrator"]
    s.node.data_dir = tmp_path / "n"
    s.trust.open = True  # an orchestrator needs a trust model; this test is about tasks
    node = Node(s)
    ctx = await node.start()
    try:
        tree = ctx.tasks.describe()
        scopes = {c["name"]: c for c in tree["scopes"]}
        assert scopes["swarm"]["policy"] == "log" and scopes["dht"]["policy"] == "log"
        assert "dht-maintenance" in scopes["dht"]["tasks"]
        orch = scopes["role:orchestrator"]
        assert "orchestrator-announce" in orch["tasks"]
        assert {"fleet-health", "fleet-discovery"} <= set(orch["scopes"][0]["tasks"])
        st = await gather_status(s, 10.0)
        assert st["tasks"]["scopes"] and "tasks" not in st["errors"]
        print_status(st)
        out = capsys.readouterr().out
        assert "role:orchestrator [stop-node]: orchestrator-announce" in out and "fleet [stop-node]:" in out
    finally:
        await node.stop()
    assert len(ctx.tasks) == 0
