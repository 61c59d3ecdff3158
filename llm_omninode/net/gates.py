"""Per-peer concurrency limits: how many requests of one kind a peer may have running at once.

QUIC already caps a connection's open streams (``QuicSettings.max_streams``), but a stream can
be cheap to open and costly to serve (a shard read holds up to a few MiB until the peer reads
it; a stage load reads manifests and loads weights). Requests past a peer's limit wait for a
slot instead of failing, so an honest peer that asks a lot is slowed, never refused, and one
peer's flood never takes slots from another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field


@dataclass
class _Gate:
    semaphore: asyncio.Semaphore
    users: int = 0  # holders and waiters: the gate is dropped when nobody needs it


@dataclass
class PeerGates:
    """``async with gates.slot(peer_id, kind):`` around the work; ``limits`` per kind."""

    limits: Mapping[str, int]
    _gates: dict[tuple[str, str], _Gate] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def slot(self, peer_id: str, kind: str) -> AsyncIterator[None]:
        key = (peer_id, kind)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(asyncio.Semaphore(self.limits[kind]))
        gate.users += 1
        try:
            async with gate.semaphore:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:  # so a stream of new node ids does not grow the table
                self._gates.pop(key, None)

    def running(self, peer_id: str, kind: str) -> int:
        """Requests of ``kind`` that ``peer_id`` has running or waiting now."""
        gate = self._gates.get((peer_id, kind))
        return gate.users if gate is not None else 0
