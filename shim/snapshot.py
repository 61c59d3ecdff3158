"""What the cluster page (shim/http/dashboard.py) shows, as one JSON document, read from the
node's public parts each time it is asked: the nodes (this one and its peers), each model's
plan, the queue, the requests (shim/request_log.py) and shard transfers.

Transfers: no progress callback reaches this module (the stage host reports a load's bytes
only to the requests waiting for it), so progress is read where the store keeps it: a shard
arriving here is a partial file in the store's tmp/ folder, its size the bytes received so far.
Peers say only which shards they hold (their INFO), so for them the page shows counts, not
progress.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.store import ShardStore

    from .peers import PeerTable
    from .request_log import RequestLog
    from .stage_host import StageHost


class _Slots(Protocol):
    parallel: int  # sequences of one model this node coordinates at once


class NodeTables(Protocol):
    """What the page reads of a node (shim/node.py's Node is one): its public tables."""

    node_id: str
    name: str
    registry: ModelRegistry
    store: ShardStore
    peers: PeerTable
    host: StageHost
    requests: RequestLog

    @property
    def generations(self) -> _Slots: ...

    def status(self) -> dict[str, Any]: ...

    def self_row(self) -> dict[str, Any]: ...

    def held_shards(self) -> list[str]: ...


ARRIVING_SUFFIX = ".part"
FORGOTTEN_SHOWN_S = 600.0  # a node the peer table forgot stays on the page, lost, this long


class ClusterView:
    """The page's data for one node. It remembers the nodes it has shown: the peer table
    forgets a killed node soon after (unless it was named with --peer), the page keeps it as
    lost for FORGOTTEN_SHOWN_S."""

    def __init__(self, node: NodeTables) -> None:
        self.node = node
        self._seen: dict[str, dict[str, Any]] = {}  # node id -> its last row
        self._lost_since: dict[str, float] = {}  # node id -> time.time() first seen lost

    def snapshot(self) -> dict[str, Any]:
        doc = snapshot(self.node)
        now = time.time()
        shown = set()
        for row in doc["nodes"]:
            node_id = row["node_id"]
            if not node_id:  # a --peer address that refused us: its row says why
                continue
            shown.add(node_id)
            self._seen[node_id] = row
            if row["live"]:
                self._lost_since.pop(node_id, None)
            else:
                self._lost_since.setdefault(node_id, now)
        for node_id, row in list(self._seen.items()):
            if node_id in shown:
                continue
            since = self._lost_since.setdefault(node_id, now)
            if now - since > FORGOTTEN_SHOWN_S:
                del self._seen[node_id], self._lost_since[node_id]
                continue
            error = row.get("error") or "no longer answers"
            doc["nodes"].append(row | {"live": False, "rtt_ms": None, "error": error})
        for row in doc["nodes"]:
            row["lost_since"] = self._lost_since.get(row["node_id"])
        return doc


def snapshot(node: NodeTables) -> dict[str, Any]:
    """What the page shows now, from the node's own tables alone."""
    status = node.status()
    nodes = _nodes(node)
    live = {n["node_id"] for n in nodes if n["live"]}
    models = []
    for plan in status["plans"]:
        stages = [s | {"live": s["node_id"] in live} for s in plan["stages"]]
        models.append(plan | {"stages": stages, "coordinated_here": True,
                              "blocks": max((s["end"] for s in stages), default=0)})  # fmt: skip
    aliases = node.registry.aliases()
    for model_id, stages in _hosted(nodes, {m["model"] for m in models}).items():
        models.append({
            "model": model_id, "aliases": [a for a, m in aliases.items() if m == model_id],
            "ready": True, "coordinated_here": False, "stages": stages,
            "blocks": max(s["end"] for s in stages),
        })  # fmt: skip
    requests = node.requests.snapshot()
    return {
        "at": round(time.time(), 3),
        "node_id": node.node_id,
        "name": node.name,
        "nodes": nodes,
        "models": models,
        "queue": {
            "generations": status["generations"],  # running or waiting for a slot, here
            "waiting": sum(1 for r in requests["running"] if r["outcome"] == "waiting"),
            "slots": node.generations.parallel,  # sequences of one model at once
            "pipelines": status["pipelines"],  # sequences passing through stages hosted here
        },
        "requests": requests,
        "transfers": _transfers(node),
    }


def _nodes(node: NodeTables) -> list[dict[str, Any]]:
    live = {p.node_id for p in node.peers.live()}
    rows = [node.self_row() | {"live": True, "error": None, "shards": len(node.held_shards())}]
    for peer in node.peers.all():
        row = peer.row() | {"live": bool(peer.node_id) and peer.node_id in live,
                            "shards": len(peer.shards)}  # fmt: skip
        rows.append(row)
    return rows


def _hosted(nodes: list[dict[str, Any]], planned: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The stages live nodes say they host, by model, for models not planned here (another
    node coordinates them): the split as the cluster holds it. Peers' rows are checked."""
    models: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        rows = n.get("stages") if n["live"] else None
        for s in rows if isinstance(rows, list) else []:
            if not isinstance(s, dict) or s.get("model") in planned:
                continue
            model, start, end = s.get("model"), s.get("start"), s.get("end")
            if isinstance(model, str) and type(start) is int and type(end) is int and \
                    0 <= start < end <= 1 << 20:  # fmt: skip
                models.setdefault(model, []).append({
                    "node_id": n["node_id"], "name": n["name"], "start": start, "end": end,
                    "weight_bytes": s.get("weight_bytes"), "ms_per_token": s.get("ms_per_token"),
                    "live": True,
                })  # fmt: skip
    return {m: sorted(stages, key=lambda s: (s["start"], s["end"])) for m, stages in models.items()}


def _transfers(node: NodeTables) -> dict[str, Any]:
    sizes: dict[str, int] = {}
    for model_id in node.store.manifests():
        with contextlib.suppress(Exception):  # a manifest that cannot be read has no sizes
            sizes.update({s.cid: s.size for s in node.store.get_manifest(model_id).shards})
    arriving = []
    with contextlib.suppress(OSError):
        for path in node.store.tmp_dir.iterdir():
            if path.name.endswith(ARRIVING_SUFFIX):
                cid = path.name.removesuffix(ARRIVING_SUFFIX)
                with contextlib.suppress(OSError):
                    arriving.append({"cid": cid, "bytes": path.stat().st_size,
                                     "size": sizes.get(cid)})  # fmt: skip
    names = {node.node_id: node.name} | {p.node_id: p.name for p in node.peers.all()}
    fetched = [
        {"model": h.model_id, "start": h.start, "end": h.end, "cid": cid,
         "size": sizes.get(cid), "from": names.get(src) or src[:16]}
        for h in node.host.stages()
        for cid, src in h.fetched.items()
    ]  # fmt: skip
    return {"arriving": arriving, "fetched": fetched}
