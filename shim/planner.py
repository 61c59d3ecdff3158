"""Placement: which node runs which contiguous range of blocks. Pure functions, no I/O.

Every coordinator that plans the same model on the same node set must reach the same plan, so
nothing here depends on input order, clocks or randomness: nodes are taken in node-id order.

The rule, in full:

1. Nodes are sorted by node id. ``max_stages`` caps how many take part, keeping the largest
   budgets.
2. A stage's cost is ``stage_bytes`` (the embedding on the first stage, the head on the last)
   plus ``kv_bytes_per_block`` per block, and must not exceed its node's budget. Of the capped
   nodes, the most that can each run at least one block within budget take part; a node that
   cannot (say too small for the embedding-bearing first stage) is left out. An exact search
   over stage boundaries decides this, so a fitting split is found whenever one exists; among
   equally large sets (more nodes than blocks, say), earlier node ids are preferred.
3. The model's work per token (``_work``: a block's parameters twice, the head's output
   matrix once) is shared so that stages take about equal time: a stage's time is its work over
   its node's ``speed`` (measured at start, llm_omninode/backend/speed.py). A bisection finds
   the least time T within which every stage (at least one block each) fits both its budget
   and T times its node's speed; budgets stay hard limits, so a fast node with little memory
   keeps what fits and the others take the rest. Balanced stages keep every node busy when
   sequences are pipelined.
4. Each boundary then gets a target that shares the work in proportion to speed, and from the
   first stage on, is put at the position nearest its target (ties: the earlier one) that
   keeps every stage within its budget and T, i.e. blocks move to neighbours only as far as
   budgets and the slowest stage's time force them.

Blocks are never reordered and a node runs one range; a plan that cannot fit is a PlanError
that says how much the model needs and how much the nodes offer.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llm_omninode.backend.cid import is_cid
from llm_omninode.backend.shards import Manifest
from llm_omninode.backend.spec import MAX_BLOCKS
from llm_omninode.net.identity import is_node_id

PLAN_FORMAT = "omninode/plan/1"
MAX_BYTES = 2**62  # any byte count past this is garbage, not a device
_MIB = 1024 * 1024


class PlanError(ValueError):
    """A node set that cannot run the model, bad planner input, or a malformed plan."""


def _mib(n: int | float) -> str:
    return f"{n / _MIB:.1f} MiB"


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass; a budget of True is a bug


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    memory_budget: int  # bytes this node may use for weights (+ KV cache)
    speed: float = 1.0  # measured compute speed (any unit, the same on every node)
    name: str = ""

    def __post_init__(self) -> None:
        if not is_node_id(self.node_id):
            raise PlanError(f"not a node id: {self.node_id!r:.80}")
        if not _is_int(self.memory_budget) or not 0 < self.memory_budget <= MAX_BYTES:
            raise PlanError(
                f"node {self.node_id}: memory_budget must be a positive int, "
                f"not {self.memory_budget!r:.40}"
            )
        speed_ok = isinstance(self.speed, int | float) and not isinstance(self.speed, bool)
        if not speed_ok or not (math.isfinite(self.speed) and self.speed > 0):
            raise PlanError(f"node {self.node_id}: speed must be a positive finite number")
        if not isinstance(self.name, str):
            raise PlanError(f"node {self.node_id}: name must be a string")


@dataclass(frozen=True)
class StageAssignment:
    node_id: str
    start: int  # blocks [start, end)
    end: int
    weight_bytes: int  # bytes of the shards this stage loads (embed if first, head if last)


@dataclass(frozen=True)
class Plan:
    model_id: str
    n_blocks: int
    stages: tuple[StageAssignment, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        _check_plan(self)

    def bounds(self) -> list[int]:
        """Stage boundaries ``[0, b1, ..., n_blocks]``: stage i runs ``[b[i], b[i + 1])``."""
        return [s.start for s in self.stages] + [self.n_blocks]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "model_id": self.model_id,
            "n_blocks": self.n_blocks,
            "stages": [
                {
                    "node_id": s.node_id,
                    "start": s.start,
                    "end": s.end,
                    "weight_bytes": s.weight_bytes,
                }
                for s in self.stages
            ],
        }

    @classmethod
    def from_json(cls, doc: object) -> Plan:
        """A plan from a peer's JSON object: exact keys and types, then every invariant."""
        _keys(doc, {"format", "model_id", "n_blocks", "stages"}, "plan")
        assert isinstance(doc, dict)
        if doc["format"] != PLAN_FORMAT:
            raise PlanError(f"plan format must be {PLAN_FORMAT!r}")
        raw_stages = doc["stages"]
        if not isinstance(raw_stages, list) or not 0 < len(raw_stages) <= MAX_BLOCKS:
            raise PlanError(f"plan stages must be a list of 1..{MAX_BLOCKS} entries")
        stages = []
        for i, s in enumerate(raw_stages):
            _keys(s, {"node_id", "start", "end", "weight_bytes"}, f"plan stage {i}")
            assert isinstance(s, dict)
            stages.append(StageAssignment(s["node_id"], s["start"], s["end"], s["weight_bytes"]))
        return cls(doc["model_id"], doc["n_blocks"], tuple(stages))


def _keys(doc: object, expected: set[str], what: str) -> None:
    if not isinstance(doc, dict):
        raise PlanError(f"{what} must be an object")
    if set(doc) != expected:
        extra = sorted(repr(k)[:40] for k in set(doc) - expected)[:5]  # a few, never thousands
        missing = sorted(expected - set(doc))
        raise PlanError(f"{what}: unknown keys {extra}, missing keys {missing}")


def _check_plan(plan: Plan) -> None:
    if not is_cid(plan.model_id):
        raise PlanError(f"plan model_id is not a model id: {plan.model_id!r:.80}")
    n = plan.n_blocks
    if not _is_int(n) or not 1 <= n <= MAX_BLOCKS:
        raise PlanError(f"plan n_blocks must be an int in [1, {MAX_BLOCKS}]")
    if not plan.stages:
        raise PlanError("a plan needs at least one stage")
    position = 0
    seen: set[str] = set()
    for i, s in enumerate(plan.stages):
        if not isinstance(s, StageAssignment):
            raise PlanError(f"plan stage {i} is not a StageAssignment")
        if not is_node_id(s.node_id):
            raise PlanError(f"plan stage {i}: not a node id: {s.node_id!r:.80}")
        if s.node_id in seen:
            raise PlanError(f"plan stage {i}: node {s.node_id} already runs a stage")
        seen.add(s.node_id)
        if not (_is_int(s.start) and _is_int(s.end) and _is_int(s.weight_bytes)):
            raise PlanError(f"plan stage {i}: start, end and weight_bytes must be ints")
        if s.start != position:
            raise PlanError(f"plan stage {i} starts at block {s.start}, expected {position}")
        if not s.start < s.end <= n:
            raise PlanError(f"plan stage {i}: blocks [{s.start}, {s.end}) empty or past {n}")
        if not 0 <= s.weight_bytes <= MAX_BYTES:
            raise PlanError(f"plan stage {i}: weight_bytes out of range")
        position = s.end
    if position != n:
        raise PlanError(f"plan stages cover blocks [0, {position}), not [0, {n})")


# ---- costs ---------------------------------------------------------------------------------


def stage_bytes(manifest: Manifest, start: int, end: int) -> int:
    """Bytes of the shards a stage running blocks ``[start, end)`` loads.

    Exactly ``manifest.shards_for_stage``: the embedding on the first stage, the head on the last,
    shared tensors everywhere, and a tied head's embedding counted once.
    """
    try:
        shards = manifest.shards_for_stage(start, end)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    return sum(s.size for s in shards)


@dataclass(frozen=True)
class _Costs:
    """``stage_bytes`` + KV in O(1): prefix sums of blocks plus a fixed part per position.

    The fixed part depends only on (first, last) because non-block shards (embed, head, shared)
    and their references do not depend on which blocks a stage runs; ``_costs`` refuses
    manifests where that would not hold.
    """

    n: int
    cum: tuple[int, ...]  # cum[i]: bytes (weights + KV) of blocks [0, i)
    fixed: Mapping[tuple[bool, bool], int]  # (first, last) -> bytes of the non-block shards

    def cost(self, start: int, end: int) -> int:
        return self.cum[end] - self.cum[start] + self.fixed[(start == 0, end == self.n)]

    def weights(self, start: int, end: int, kv_bytes_per_block: int) -> int:
        return self.cost(start, end) - kv_bytes_per_block * (end - start)

    def max_end(self, start: int, budget: int) -> int:
        """The furthest ``end`` whose stage from ``start`` fits ``budget``; ``start`` if none.

        Cost grows with ``end`` (the head only adds), so a fitting last stage means every
        shorter one fits too, and otherwise a bisection over the prefix sums finds it.
        """
        if self.cost(start, self.n) <= budget:
            return self.n
        limit = budget - self.fixed[(start == 0, False)] + self.cum[start]
        end = min(bisect_right(self.cum, limit) - 1, self.n - 1)
        return end if end > start else start


def _costs(manifest: Manifest, kv_bytes_per_block: int) -> _Costs:
    n = manifest.n_blocks
    blocks: dict[int, int] = {}
    by_name = {s.name: s for s in manifest.shards}
    homes = {t.name: s for s in manifest.shards for t in s.tensors}
    for s in manifest.shards:
        if s.kind == "block" and s.index is not None:
            blocks[s.index] = s.size
        for ref in s.refs:
            home = homes.get(ref)
            if s.kind == "block" or home is None or home.kind == "block":
                # would make a stage's bytes depend on which blocks it holds: not a model the
                # sharder writes, so refuse rather than mis-plan
                raise PlanError(f"shard {s.name} references {ref}: not plannable")
    if sorted(blocks) != list(range(n)):
        raise PlanError("manifest blocks are not 0..N-1")
    cum = [0]
    for i in range(n):
        cum.append(cum[-1] + blocks[i] + kv_bytes_per_block)

    def fixed(first: bool, last: bool) -> int:
        # the same selection as Manifest.shards_for_stage, minus the blocks
        wanted = ["shared"] if "shared" in by_name else []
        wanted += (["embed"] if first else []) + (["head"] if last else [])
        chosen = {name: by_name[name] for name in wanted}
        for s in list(chosen.values()):
            for ref in s.refs:
                chosen.setdefault(homes[ref].name, homes[ref])
        return sum(s.size for s in chosen.values())

    table = {(f, la): fixed(f, la) for f in (False, True) for la in (False, True)}
    return _Costs(n, tuple(cum), table)


# ---- planning ------------------------------------------------------------------------------


def _work(manifest: Manifest) -> tuple[list[int], int]:
    """(cumulative work of blocks [0, i), work of the head), in parameters touched per token.

    A block counts its parameters twice: once for its matmuls and as much again for what a
    block costs besides (norms, attention over the cache, rope, each call's fixed overhead);
    the head counts its output matrix once. Measured on SmolLM2 (Linux CPU, one thread): a
    block ~1.0 ms a token, the head ~4 ms, and these weights give 7.1M per block, 28.3M for
    the head: the same 1:4.
    """
    params: dict[int, int] = {}
    head = embed = 0
    for shard in manifest.shards:
        for t in shard.tensors:
            n = math.prod(t.shape)
            if shard.kind == "block" and shard.index is not None:
                params[shard.index] = params.get(shard.index, 0) + n
            elif t.name == "output.weight":
                head = n
            elif t.name == "token_embd.weight":
                embed = n
    cum = [0]
    for i in range(manifest.n_blocks):
        cum.append(cum[-1] + 2 * params.get(i, 0))
    return cum, head or embed  # no output matrix: the tied embedding is the head


def _targets(work: tuple[list[int], int], speeds: Sequence[float]) -> list[int]:
    """Boundary targets that share the model's work (``_work``) in proportion to speed, every
    node at least one block.

    The head is large (SmolLM2's is the work of four blocks): splitting blocks evenly would
    leave the last stage the slowest, and every other stage waiting on it whenever several
    sequences are pipelined.
    """
    cum, head = work
    n, m = len(cum) - 1, len(speeds)
    total, whole, share = cum[n] + head, math.fsum(speeds), 0.0
    bounds = [0]
    for j, speed in enumerate(speeds[:-1]):
        share += speed
        want = total * share / whole
        lo, hi = bounds[-1] + 1, n - (m - 1 - j)
        bounds.append(min(range(lo, hi + 1), key=lambda e: (abs(cum[e] - want), e)))
    return [*bounds, n]


def _work_end(work: tuple[list[int], int], start: int, allowed: float) -> int:
    """The furthest ``end`` whose stage from ``start`` does at most ``allowed`` work; ``start``
    if none (the head counts on the last stage only)."""
    cum, head = work
    n = len(cum) - 1
    if cum[n] - cum[start] + head <= allowed:
        return n
    end = min(bisect_right(cum, cum[start] + allowed) - 1, n - 1)
    return end if end > start else start


def _participants(costs: _Costs, budgets: Sequence[int]) -> list[int] | None:
    """Indices of the most nodes that can each run >= 1 block, in order; None if none can.

    ``most[j][b]``: the largest number of nodes among j.. that can run blocks [b, n) between
    them, each at least one block within budget, the others left out (-1: impossible). A node
    that cannot take a block where it stands (the first must also hold the embedding) is the
    one left out; leaving out a node never lets a later one start earlier.
    """
    n, m = costs.n, len(budgets)
    most = [[-1] * (n + 1) for _ in range(m + 1)]
    most[m][n] = 0
    for j in reversed(range(m)):
        after, row = most[j + 1], most[j]
        # sliding maximum of after[e] over e in (b, max_end(b)]; both ends only move right
        window: deque[int] = deque()
        pushed = 0
        for b in range(n + 1):
            take = -1
            if b < n:
                hi = costs.max_end(b, budgets[j])
                while pushed <= hi:
                    while window and after[window[-1]] <= after[pushed]:
                        window.pop()
                    window.append(pushed)
                    pushed += 1
                while window and window[0] <= b:
                    window.popleft()
                if window and after[window[0]] >= 0:
                    take = after[window[0]] + 1
            row[b] = max(after[b], take)
    if most[0][0] < 1:
        return None
    chosen, b, wanted = [], 0, most[0][0]
    for j in range(m):
        if b == n:
            break
        ends = range(b + 1, costs.max_end(b, budgets[j]) + 1)
        end = next((e for e in ends if most[j + 1][e] == wanted - 1), None)
        if end is not None:  # take this node when that still reaches the most nodes
            chosen.append(j)
            b, wanted = end, wanted - 1
    return chosen


Ends = Callable[[int, int], int]  # (node j, start) -> the furthest end node j may run to


def _reachable(n: int, m: int, ends: Ends) -> list[list[bool]]:
    """``ok[j][b]``: nodes j.. can run blocks [b, n), each at least one block and at most to
    ``ends(j, start)`` (every shorter stage from ``start`` is allowed too)."""
    ok = [[False] * (n + 1) for _ in range(m + 1)]
    ok[m][n] = True
    for j in reversed(range(m)):
        after = ok[j + 1]
        count = [0]  # count[i]: reachable boundaries in after[:i]
        for flag in after:
            count.append(count[-1] + flag)
        for start in range(n):
            end = ends(j, start)
            ok[j][start] = end > start and count[end + 1] > count[start + 1]
    return ok


def _limits(costs: _Costs, budgets: Sequence[int], work: tuple[list[int], int],
            speeds: Sequence[float], time: float) -> Ends:  # fmt: skip
    """Stage ends within each node's budget and within ``time`` (work over speed)."""

    def ends(j: int, start: int) -> int:
        return min(costs.max_end(start, budgets[j]), _work_end(work, start, time * speeds[j]))

    return ends


def _least_time(
    costs: _Costs, budgets: Sequence[int], work: tuple[list[int], int], speeds: Sequence[float]
) -> float:
    """About the least time (work over speed) within which every stage fits, by bisection:
    to within half the smallest block's time on the fastest node, where one block more or less
    cannot balance stages any better. Budgets alone must admit a split."""
    cum, head = work
    n, m = costs.n, len(budgets)
    total = cum[n] + head
    lo, hi = total / math.fsum(speeds), 2.0 * total / min(speeds)  # hi: time never binds
    step = min((cum[i + 1] - cum[i] for i in range(n) if cum[i + 1] > cum[i]), default=1)
    tolerance = step / (2.0 * max(speeds))
    for _ in range(200):  # far more than a float's precision needs: never endless
        if hi - lo <= tolerance:
            break
        mid = (lo + hi) / 2
        if _reachable(n, m, _limits(costs, budgets, work, speeds, mid))[0][0]:
            hi = mid
        else:
            lo = mid
    return hi


def _split(
    costs: _Costs, budgets: Sequence[int], work: tuple[list[int], int], speeds: Sequence[float]
) -> list[int] | None:
    """Boundaries nearest the speed-proportional targets that fit every budget and the least
    time (``_least_time``), or None if the budgets admit no split."""
    n, m = costs.n, len(budgets)
    if not _reachable(n, m, _limits(costs, budgets, work, speeds, math.inf))[0][0]:
        return None
    ends = _limits(costs, budgets, work, speeds, _least_time(costs, budgets, work, speeds))
    ok = _reachable(n, m, ends)
    target = _targets(work, speeds)
    bounds = [0]
    for j in range(m):
        start = bounds[-1]
        fits = [e for e in range(start + 1, ends(j, start) + 1) if ok[j + 1][e]]
        bounds.append(min(fits, key=lambda e: (abs(e - target[j + 1]), e)))
    return bounds


def plan_stages(
    manifest: Manifest,
    nodes: Sequence[NodeCapacity],
    *,
    kv_bytes_per_block: int = 0,
    max_stages: int | None = None,
) -> Plan:
    """Place the model's blocks on ``nodes`` (see the module docstring for the rule)."""
    if not nodes:
        raise PlanError("no nodes to place the model on")
    if not all(isinstance(node, NodeCapacity) for node in nodes):
        raise PlanError("nodes must be NodeCapacity records")
    ids = [node.node_id for node in nodes]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise PlanError(f"node ids offered twice: {', '.join(dupes)}")
    if not _is_int(kv_bytes_per_block) or not 0 <= kv_bytes_per_block <= MAX_BYTES:
        raise PlanError("kv_bytes_per_block must be an int >= 0")
    if max_stages is not None and (not _is_int(max_stages) or max_stages < 1):
        raise PlanError("max_stages must be an int >= 1")

    n = manifest.n_blocks
    costs = _costs(manifest, kv_bytes_per_block)
    ranked = list(nodes)
    if max_stages is not None:
        # keep the largest budgets (speed, then id, break ties)
        ranked.sort(key=lambda c: (-c.memory_budget, -c.speed, c.node_id))
        ranked = ranked[:max_stages]
    offered = sorted(ranked, key=lambda c: c.node_id)

    picked = _participants(costs, [c.memory_budget for c in offered])
    if picked is not None:
        chosen = [offered[j] for j in picked]
        budgets, speeds = [c.memory_budget for c in chosen], [c.speed for c in chosen]
        bounds = _split(costs, budgets, _work(manifest), speeds)
        assert bounds is not None  # _participants found a split for exactly these nodes
        stages = tuple(
            StageAssignment(
                c.node_id,
                bounds[j],
                bounds[j + 1],
                costs.weights(bounds[j], bounds[j + 1], kv_bytes_per_block),
            )
            for j, c in enumerate(chosen)
        )
        return Plan(manifest.model_id, n, stages)
    raise PlanError(_refusal(manifest, costs, offered, kv_bytes_per_block, len(nodes)))


def _refusal(
    manifest: Manifest,
    costs: _Costs,
    offered: Sequence[NodeCapacity],
    kv_bytes_per_block: int,
    n_given: int,
) -> str:
    need = f"model needs {_mib(manifest.total_bytes)}"
    kv = kv_bytes_per_block * costs.n
    need += f" (+ {_mib(kv)} KV)" if kv else ""
    offer = sum(c.memory_budget for c in offered)
    cut = f" (max_stages kept {len(offered)} of {n_given})" if len(offered) < n_given else ""
    nodes = f"the {len(offered)} nodes offer" if len(offered) > 1 else "the one node offers"
    text = f"cannot place the model: {need}, {nodes} {_mib(offer)}{cut}"
    if offer < manifest.total_bytes + kv:
        return text  # plainly too little memory: nothing more to explain
    largest = max(c.memory_budget for c in offered)
    first = costs.cost(0, 1)
    if largest < first:
        return text + (
            f"; the first stage alone needs {_mib(first)} and the largest node offers "
            f"{_mib(largest)}"
        )
    return text + (
        f"; no split into contiguous stages fits those budgets (the first stage needs at least "
        f"{_mib(costs.cost(0, 1))}, the last at least {_mib(costs.cost(costs.n - 1, costs.n))})"
    )


def describe(plan: Plan, names: Mapping[str, str] | None = None) -> str:
    """A readable preview, one line per stage: blocks, what else it loads, bytes, node."""
    names = names or {}
    width = len(str(plan.n_blocks - 1))
    lines = []
    last = len(plan.stages) - 1
    for i, s in enumerate(plan.stages):
        extras = [x for x, on in (("embed", i == 0), ("head", i == last)) if on]
        span = f"{s.start:>{width}}-{s.end - 1:<{width}}"
        node = s.node_id[:16] + "..."
        if names.get(s.node_id):
            node = f"{names[s.node_id]} ({node})"
        lines.append(
            f"stage {i}: blocks {span} ({s.end - s.start:>{width}}) "
            f"{'+ ' + ' + '.join(extras) if extras else '':<15} "
            f"{_mib(s.weight_bytes):>12}  {node}"
        )
    return "\n".join(lines)
