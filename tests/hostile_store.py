"""A hostile replication peer built from swarmd's own StoreRole, with its own key.

It holds a real model of its own, pushed under a version the victim does not
have yet with `uploader` forged to the operator's key (a squat), and its
storeState answer adds tombstones stamped far in the future for the victim's
rows and as many tombstones of rows nobody holds as one answer may carry
(bloat). Every storeState and listModels call it gets is counted by caller key.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, ClassVar

from swarmd.names import ModelMeta
from swarmd.roles.store import StoreRole
from swarmd.roles.store_replication import PAGE_ROWS


class HostileStore(StoreRole):
    victim_rows: ClassVar[list[ModelMeta]] = []  # the victim's rows, to forge future tombstones for
    calls: ClassVar[Counter[str]] = Counter()  # "method:caller key" -> count

    def _count(self, method: str, ctx: Any) -> None:
        peer = getattr(ctx, "peer", None)
        self.calls[f"{method}:{peer.hex() if isinstance(peer, bytes) else 'local'}"] += 1

    def forged_rows(self) -> list[dict[str, Any]]:
        future = time.time() + 10**6
        rows = [ModelMeta(m.name, m.version, m.digest, m.size, created=m.created, deleted=future, updated=future)
                for m in self.victim_rows]
        n = PAGE_ROWS - len(rows) - len(self.core.catalog.list(include_deleted=True))
        rows += [ModelMeta(f"junk{i}", "1", f"{i:064x}", 1, created=1.0, deleted=2.0, updated=2.0) for i in range(n)]
        return [r.to_dict(replication=True) for r in rows]

    async def store_state(self, ctx: Any, params: Any) -> dict[str, Any]:
        self._count("storeState", ctx)
        real = await super().store_state(ctx, params)
        real["models"] = (real["models"] + self.forged_rows())[:PAGE_ROWS]
        since = params.get("since", 0) if isinstance(params, dict) else 0
        real["head"] = real["cursor"] = since + len(real["models"])
        real["more"] = True  # "there is always more": ask again at once
        return real

    async def list_models(self, ctx: Any, params: Any) -> dict[str, Any]:
        self._count("listModels", ctx)
        return await super().list_models(ctx, params)
