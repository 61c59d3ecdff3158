"""What the coordinator uses of the node it runs on (shim/node.py's Node is one): its
identity and budget, its stage host, peers, models and store, its metrics. The coordinator
depends on this, not on the node module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.store import ShardStore
    from llm_omninode.net.transfer import ShardSource

    from .metrics import Metrics
    from .peers import PeerTable
    from .stage_host import StageHost


class NodeParts(Protocol):
    node_id: str
    name: str
    port: int
    max_context: int | None
    memory_budget: int
    speed: float
    host: StageHost
    peers: PeerTable
    registry: ModelRegistry
    store: ShardStore
    metrics: Metrics

    @property
    def advertised_host(self) -> str: ...

    def held_shards(self) -> list[str]: ...

    def shard_sources(self, cid: str) -> list[ShardSource]: ...
