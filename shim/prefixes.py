"""Which finished sequences' KV caches the stages still keep, and what those caches hold.

A sequence that ends well is parked on every stage of its plan (shim/stage_host.py keeps a
few per stage). A new request whose prompt starts with what a parked sequence holds, on the
same plan, continues from that cache (``Reuse``): a chat's next turn computes only its new
tokens. Pure bookkeeping; a stage that dropped the cache meanwhile answers "cache miss" and
the prompt is computed whole.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from .pipeline import Reuse
from .planner import Plan

MIN_REUSE = 8  # cached positions worth reusing (fewer: just compute them)
MAX_PARKED = 16  # parked sequences remembered here (each stage keeps its own few)

Route = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Parked:
    model_id: str
    route: Route  # (node, start, end) of every stage that keeps it
    tokens: tuple[int, ...]  # the positions its caches hold


def route_of(plan: Plan) -> Route:
    return tuple((s.node_id, s.start, s.end) for s in plan.stages)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y or n >= limit:
            break
        n += 1
    return n


class PrefixTable:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._parked: OrderedDict[str, Parked] = OrderedDict()  # oldest first

    def park(self, seq: str, model_id: str, plan: Plan, cached: Sequence[int]) -> None:
        if not self.enabled:
            return
        self._parked[seq] = Parked(model_id, route_of(plan), tuple(cached))
        while len(self._parked) > MAX_PARKED:
            self._parked.popitem(last=False)

    def take(self, model_id: str, plan: Plan, ids: Sequence[int]) -> Reuse | None:
        """The parked sequence sharing the longest prefix with ``ids`` on this very plan, if
        that prefix is worth it; it is taken (a cache continues one sequence only). At least
        one token is left to compute: its logits pick the next token."""
        route, best, best_len = route_of(plan), None, MIN_REUSE - 1
        for seq, parked in self._parked.items():
            if parked.model_id == model_id and parked.route == route:
                n = common_prefix(parked.tokens, ids, limit=len(ids) - 1)
                if n > best_len:
                    best, best_len = seq, n
        if best is None:
            return None
        del self._parked[best]
        return Reuse(best, best_len)
