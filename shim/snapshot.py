"""What the cluster page (shim/http/dashboard.py) shows, as one JSON document, read from the
node's public parts each time it is asked: the nodes (this one and its peers), each model's
plan, the queue, the requests (shim/request_log.py) and shard transfers.

Transfers: no progress callback reaches this module (the stage host fetches shards without
one), so progress is read where the store keeps it: a shard arriving here is a partial file in
the store's tmp/ folder, its size the bytes received so far. Peers say only which shards they
hold (their INFO), so for them the page shows counts, not progress.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .node import Node

ARRIVING_SUFFIX = ".part"


def snapshot(node: Node) -> dict[str, Any]:
    status = node.status()
    nodes = _nodes(node)
    live = {n["node_id"] for n in nodes if n["live"]}
    models = []
    for plan in status["plans"]:
        stages = [s | {"live": s["node_id"] in live} for s in plan["stages"]]
        models.append(plan | {"stages": stages, "blocks": max((s["end"] for s in stages),
                                                              default=0)})  # fmt: skip
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
            "slots": node.coordinator.parallel,  # sequences of one model at once
            "pipelines": status["pipelines"],  # sequences passing through stages hosted here
        },
        "requests": requests,
        "transfers": _transfers(node),
    }


def _nodes(node: Node) -> list[dict[str, Any]]:
    live = {p.node_id for p in node.peers.live()}
    rows = [node.self_row() | {"live": True, "error": None, "shards": len(node.held_shards())}]
    for peer in node.peers.all():
        row = peer.row() | {"live": bool(peer.node_id) and peer.node_id in live,
                            "shards": len(peer.shards)}  # fmt: skip
        rows.append(row)
    return rows


def _transfers(node: Node) -> dict[str, Any]:
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
