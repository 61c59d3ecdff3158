"""Placement as a pure function: stages of about equal time, budget-respecting, deterministic,
strict JSON."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omninode_shim.planner import (
    NodeCapacity,
    Plan,
    PlanError,
    StageAssignment,
    _costs,
    _work,
    describe,
    plan_stages,
    stage_bytes,
)
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.ggml_types import GGMLType, GGUFValueType
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.shards import build_manifest, manifest_from_gguf
from llm_omninode.net.identity import node_id_from_public_key

MIB = 1024 * 1024


def node_id(i: int) -> str:
    return node_id_from_public_key(bytes([i]) * 32)


# ids 0..9 in node-id order, so tests can say "the first node" and mean it
IDS = sorted(node_id(i) for i in range(1, 11))


def model(blocks, embed=64, head=32, *, tied=True, shared=0):
    """A manifest of F32 tensors with these shard sizes in bytes (multiples of 32)."""
    tensors = [("token_embd.weight", embed)]
    tensors += [(f"blk.{i}.w", size) for i, size in enumerate(blocks)]
    tensors.append(("output_norm.weight", head if tied else 32))
    if not tied:
        tensors.append(("output.weight", head))
    if shared:
        tensors.append(("rope_freqs.weight", shared))
    specs = [(name, GGMLType.F32, (size // 4,), i) for i, (name, size) in enumerate(tensors)]
    sizes = dict(tensors)

    def tensor_bytes(name):
        return name.encode().ljust(sizes[name], b"\0")

    meta = {"general.architecture": "llama"}
    types = {"general.architecture": (int(GGUFValueType.STRING), None)}
    return build_manifest(meta, types, specs, tensor_bytes)


def stages_of(plan):
    return [(s.node_id, s.start, s.end) for s in plan.stages]


def cost(manifest, stage, kv=0):
    return stage_bytes(manifest, stage.start, stage.end) + kv * (stage.end - stage.start)


# ---- stage_bytes -------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shared", [0, 96])
def test_stage_bytes_embed_on_first_head_on_last_and_fast_costs_agree(tied, shared):
    m = model([320, 352, 384, 416], embed=1024, head=128, tied=tied, shared=shared)
    embed, head = m.shard("embed").size, m.shard("head").size
    assert stage_bytes(m, 1, 3) == 352 + 384 + shared
    assert stage_bytes(m, 0, 2) == embed + 320 + 352 + shared
    # a tied head reads the embedding: the last stage loads it too, the only stage once
    assert stage_bytes(m, 3, 4) == 416 + head + shared + (embed if tied else 0)
    assert stage_bytes(m, 0, 4) == m.total_bytes
    for kv in (0, 64):
        costs = _costs(m, kv)
        for s, e in itertools.combinations(range(5), 2):
            assert costs.cost(s, e) == stage_bytes(m, s, e) + kv * (e - s)


def test_stage_bytes_of_a_real_gguf(tmp_path):
    path = write_tiny_llama(tmp_path / "t.gguf", n_blocks=4)
    with open_gguf(path) as gguf:
        m = manifest_from_gguf(gguf)
    names = [s.name for s in m.shards_for_stage(2, 4)]
    assert names == ["block.2", "block.3", "head", "embed"]  # tied: head references embed
    assert stage_bytes(m, 2, 4) == sum(m.shard(n).size for n in names)
    with pytest.raises(PlanError):
        stage_bytes(m, 3, 3)


# ---- plan_stages -------------------------------------------------------------------------


def test_one_node_gets_everything():
    m = model([256] * 6)
    plan = plan_stages(m, [NodeCapacity(IDS[0], m.total_bytes)])
    assert stages_of(plan) == [(IDS[0], 0, 6)]
    assert plan.stages[0].weight_bytes == m.total_bytes
    assert plan.bounds() == [0, 6] and plan.model_id == m.model_id


def test_speeds_one_to_three_get_blocks_one_to_three():
    m = model([256] * 40, embed=256, head=32, tied=False)  # a head of no weight to speak of
    slow, fast = NodeCapacity(IDS[0], MIB, 1.0), NodeCapacity(IDS[1], MIB, 3.0)
    assert stages_of(plan_stages(m, [fast, slow])) == [(IDS[0], 0, 10), (IDS[1], 10, 40)]
    # the other way round in id order: still 1:3
    slow, fast = NodeCapacity(IDS[1], MIB, 1.0), NodeCapacity(IDS[0], MIB, 3.0)
    assert stages_of(plan_stages(m, [slow, fast])) == [(IDS[0], 0, 30), (IDS[1], 30, 40)]


def test_a_node_twice_as_fast_gets_twice_the_work():
    # SmolLM2's shape (the tied head is the work of 4 blocks): 34 blocks' work, 2:1 is 22.7 to
    # 11.3; 23 blocks on the fast node (11.5 blocks' time) and 7 + the head on the slow one (11)
    m = model([256] * 30, embed=8 * 256, head=32, tied=True)
    fast, slow = NodeCapacity(IDS[0], MIB, 2.0), NodeCapacity(IDS[1], MIB, 1.0)
    assert plan_stages(m, [fast, slow]).bounds() == [0, 23, 30]
    # the slow node first: 30 * 1/3 = 10 blocks there, 20 + the head on the fast one
    slow, fast = NodeCapacity(IDS[0], MIB, 1.0), NodeCapacity(IDS[1], MIB, 2.0)
    assert plan_stages(m, [fast, slow]).bounds() == [0, 11, 30]


def test_equal_speeds_split_evenly_whatever_the_budgets():
    m = model([256] * 40, embed=256, head=32, tied=False)
    budgets = [400 * 256, 25 * 256, 4 * MIB, 11 * 256]  # all room for their 10 blocks
    nodes = [NodeCapacity(i, b) for i, b in zip(IDS[:4], budgets, strict=True)]
    assert plan_stages(m, nodes).bounds() == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_fast_node_with_little_memory_is_capped_and_the_rest_shared(where):
    # a node 4x as fast could take 2/3 of the work, but its budget holds 6 blocks (the first
    # stage's embedding besides): the other two share the remaining 54 evenly, wherever the
    # small node stands in the order
    m = model([1024] * 60, embed=1024, head=32, tied=False)
    start = [0, 27, 54][where]
    small = stage_bytes(m, start, start + 6)
    nodes = [NodeCapacity(i, 64 * MIB) for i in IDS[:3]]
    nodes[where] = NodeCapacity(IDS[where], small, 4.0)
    sizes = [s.end - s.start for s in plan_stages(m, nodes).stages]
    assert sizes == [27, 27, 27][:where] + [6] + [27, 27][where:]


def test_a_fast_node_too_small_to_use_is_left_out():
    m = model([1024] * 6, embed=8192, head=32, tied=False)
    tiny = NodeCapacity(IDS[0], 4096, 100.0)  # fast, but never fits the embedding
    others = [NodeCapacity(IDS[1], 64 * 1024, 1.0), NodeCapacity(IDS[2], 64 * 1024, 2.0)]
    plan = plan_stages(m, [tiny, *others])
    assert stages_of(plan) == [(IDS[1], 0, 2), (IDS[2], 2, 6)]


def test_a_very_slow_node_still_runs_one_block():
    # taking part is decided by memory alone: speed shares the work, at least a block each
    m = model([256] * 10, embed=256, head=32, tied=False)
    nodes = [NodeCapacity(IDS[0], MIB, 1000.0), NodeCapacity(IDS[1], MIB, 0.01)]
    assert plan_stages(m, nodes).bounds() == [0, 9, 10]


def test_the_heads_work_moves_blocks_to_the_first_stage():
    # SmolLM2's shape: the tied head is the work of 4 blocks, so equal nodes split 17/13 and
    # each does half the work per token, not 15/15 with the last stage the slower one
    m = model([256] * 30, embed=8 * 256, head=32, tied=True)
    nodes = [NodeCapacity(IDS[0], 8 * 1024), NodeCapacity(IDS[1], 8 * 1024)]
    assert plan_stages(m, nodes).bounds() == [0, 17, 30]


def test_budget_moves_blocks_to_a_neighbour_with_room():
    # equal budgets would split 5/5, but the first stage also carries a big embedding
    m = model([1024] * 10, embed=4096, head=32, tied=False)
    budget = 8 * 1024
    plan = plan_stages(m, [NodeCapacity(IDS[0], budget), NodeCapacity(IDS[1], budget)])
    assert plan.bounds() == [0, 4, 10]
    for stage in plan.stages:
        assert cost(m, stage) <= budget


def test_exact_fit_and_one_byte_short():
    m = model([1024] * 10, embed=2048, head=512, tied=False)
    first = stage_bytes(m, 0, 5)
    last = stage_bytes(m, 5, 10)
    nodes = [NodeCapacity(IDS[0], first), NodeCapacity(IDS[1], last)]
    plan = plan_stages(m, nodes)
    assert plan.bounds() == [0, 5, 10]
    assert [s.weight_bytes for s in plan.stages] == [first, last]
    with pytest.raises(PlanError, match="cannot place"):
        plan_stages(m, [NodeCapacity(IDS[0], first), NodeCapacity(IDS[1], last - 1)])


def test_kv_cache_counts_against_the_budget():
    m = model([1024] * 8, embed=8192, head=32, tied=False)
    budgets = {IDS[0]: 8192 + 4 * 1024, IDS[1]: 8 * 1024 + 4 * 1024 + 64}
    nodes = [NodeCapacity(i, b) for i, b in budgets.items()]
    assert plan_stages(m, nodes).bounds() == [0, 4, 8]
    kv = 1024  # now the first node holds two blocks and their cache, the second the rest
    tight = plan_stages(m, nodes, kv_bytes_per_block=kv)
    assert tight.bounds() == [0, 2, 8]
    for stage in tight.stages:
        assert cost(m, stage, kv) <= budgets[stage.node_id]
        assert stage.weight_bytes == stage_bytes(m, stage.start, stage.end)  # weights only
    with pytest.raises(PlanError, match="KV"):
        plan_stages(m, nodes, kv_bytes_per_block=kv + 32)


def test_node_too_small_for_the_first_stage_is_left_out():
    m = model([1024] * 6, embed=8192, head=32, tied=False)
    tiny = NodeCapacity(IDS[0], 2048)  # a block or two, never the embedding
    others = [NodeCapacity(IDS[1], 64 * 1024), NodeCapacity(IDS[2], 64 * 1024)]
    plan = plan_stages(m, [tiny, *others])
    assert [s.node_id for s in plan.stages] == [IDS[1], IDS[2]]
    # the same small node in the middle of the order can run a block, so it is used
    middle = NodeCapacity(IDS[1], 2048)
    ends = [NodeCapacity(IDS[0], 64 * 1024), NodeCapacity(IDS[2], 64 * 1024)]
    plan = plan_stages(m, [middle, *ends])
    assert [s.node_id for s in plan.stages] == [IDS[0], IDS[1], IDS[2]]
    assert cost(m, plan.stages[1]) <= 2048


def test_refusal_says_what_is_needed_and_offered():
    m = model([MIB] * 90, embed=2 * MIB, head=32, tied=False)
    nodes = [NodeCapacity(IDS[0], 30 * MIB), NodeCapacity(IDS[1], 30 * MIB)]
    with pytest.raises(PlanError) as info:
        plan_stages(m, nodes)
    text = str(info.value)
    assert "model needs 92.0 MiB" in text and "the 2 nodes offer 60.0 MiB" in text
    with pytest.raises(PlanError, match=r"\(\+ 90\.0 MiB KV\)"):
        plan_stages(m, nodes, kv_bytes_per_block=MIB)
    # enough in total, but the first stage alone does not fit anywhere
    big_embed = model([1024] * 4, embed=8 * MIB, head=32, tied=False)
    many = [NodeCapacity(i, 4 * MIB) for i in IDS[:4]]
    with pytest.raises(PlanError, match="first stage alone needs 8.0 MiB"):
        plan_stages(big_embed, many)


def test_tied_embedding_is_loaded_on_the_last_stage_too():
    m = model([1024] * 4, embed=4096, head=32, tied=True)
    # together they offer more than the model, but both ends need the embedding
    nodes = [NodeCapacity(IDS[0], 4096 + 2048 + 512), NodeCapacity(IDS[1], 2048 + 32)]
    assert sum(n.memory_budget for n in nodes) > m.total_bytes
    with pytest.raises(PlanError, match="no split into contiguous stages"):
        plan_stages(m, nodes)
    nodes[1] = NodeCapacity(IDS[1], 4096 + 2048 + 32)
    plan = plan_stages(m, nodes)
    assert plan.bounds() == [0, 2, 4]
    assert plan.stages[1].weight_bytes == 2048 + 32 + 4096


@pytest.mark.parametrize(
    "nodes, problem",
    [
        ([], "no nodes"),
        ([NodeCapacity(IDS[0], 10**6), NodeCapacity(IDS[0], 10**6)], "twice"),
    ],
)
def test_bad_node_sets(nodes, problem):
    with pytest.raises(PlanError, match=problem):
        plan_stages(model([256] * 2), nodes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": "omni1nope", "memory_budget": 10},
        {"node_id": IDS[0], "memory_budget": 0},
        {"node_id": IDS[0], "memory_budget": -5},
        {"node_id": IDS[0], "memory_budget": True},
        {"node_id": IDS[0], "memory_budget": 1.5},
        {"node_id": IDS[0], "memory_budget": 10, "speed": float("nan")},
        {"node_id": IDS[0], "memory_budget": 10, "speed": 0},
    ],
)
def test_bad_capacities(kwargs):
    with pytest.raises(PlanError):
        NodeCapacity(**kwargs)


def test_max_stages_keeps_the_largest_budgets_and_more_nodes_than_blocks():
    m = model([256] * 3)
    nodes = [NodeCapacity(i, (k + 1) * 10**6) for k, i in enumerate(IDS[:5])]
    plan = plan_stages(m, nodes, max_stages=2)
    assert {s.node_id for s in plan.stages} == {IDS[3], IDS[4]}
    plan = plan_stages(m, nodes)  # five nodes, three blocks: the first three by id
    assert [s.node_id for s in plan.stages] == IDS[:3]
    with pytest.raises(PlanError):
        plan_stages(m, nodes, max_stages=0)
    with pytest.raises(PlanError):
        plan_stages(m, nodes, kv_bytes_per_block=-1)


# ---- properties --------------------------------------------------------------------------


def brute_force_most(manifest, budgets, kv):
    """Largest number of nodes (in order, any subset) that can each run >= 1 block, or 0."""
    n, m = manifest.n_blocks, len(budgets)
    best = 0
    for k in range(1, min(m, n) + 1):
        for subset in itertools.combinations(range(m), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                if all(
                    stage_bytes(manifest, bounds[i], bounds[i + 1])
                    + kv * (bounds[i + 1] - bounds[i])
                    <= budgets[j]
                    for i, j in enumerate(subset)
                ):
                    best = k
                    break
            if best == k:
                break
    return best


cases = st.fixed_dictionaries(
    {
        "blocks": st.lists(st.integers(1, 8).map(lambda x: 32 * x), min_size=1, max_size=6),
        "embed": st.integers(1, 8).map(lambda x: 32 * x),
        "head": st.integers(1, 4).map(lambda x: 32 * x),
        "tied": st.booleans(),
        "kv": st.sampled_from([0, 32]),
        "budgets": st.lists(st.integers(32, 1200), min_size=1, max_size=4),
        "speeds": st.lists(st.sampled_from([0.25, 1.0, 1.0, 2.0, 7.5]), min_size=4, max_size=4),
        "order": st.randoms(use_true_random=False),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_plan_invariants_and_optimality(case):
    m = model(case["blocks"], case["embed"], case["head"], tied=case["tied"])
    kv = case["kv"]
    ids = IDS[: len(case["budgets"])]
    nodes = [
        NodeCapacity(i, b, sp)
        for i, b, sp in zip(ids, case["budgets"], case["speeds"], strict=False)
    ]
    shuffled = list(nodes)
    case["order"].shuffle(shuffled)
    most = brute_force_most(m, case["budgets"], kv)
    try:
        plan = plan_stages(m, nodes, kv_bytes_per_block=kv)
    except PlanError as exc:
        assert most == 0, f"a split over {most} nodes exists: {exc}"
        with pytest.raises(PlanError):
            plan_stages(m, shuffled, kv_bytes_per_block=kv)
        return
    # determinism: the input order does not matter
    assert plan_stages(m, shuffled, kv_bytes_per_block=kv) == plan
    # as many nodes as can each take a block
    assert len(plan.stages) == most
    # contiguous, covering, in node-id order, within budget, bytes as loaded
    assert plan.bounds()[0] == 0 and plan.bounds()[-1] == m.n_blocks
    assert all(a.end == b.start for a, b in itertools.pairwise(plan.stages))
    assert [s.node_id for s in plan.stages] == sorted(s.node_id for s in plan.stages)
    budget = {n.node_id: n.memory_budget for n in nodes}
    for s in plan.stages:
        assert s.end > s.start
        assert s.weight_bytes == stage_bytes(m, s.start, s.end)
        assert s.weight_bytes + kv * (s.end - s.start) <= budget[s.node_id]
    assert plan.stages[0].weight_bytes >= m.shard("embed").size
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    # the slowest stage within half a block's time (on the fastest node) of the best split
    # of these nodes that fits
    cum, head = _work(m)
    speed = {n.node_id: n.speed for n in nodes}
    chosen = [s.node_id for s in plan.stages]

    def slowest(bounds):
        return max(
            (cum[e] - cum[b] + (head if e == m.n_blocks else 0)) / speed[node]
            for node, b, e in zip(chosen, bounds, bounds[1:], strict=False)
        )

    def fits(bounds):
        return all(
            stage_bytes(m, b, e) + kv * (e - b) <= budget[node]
            for node, b, e in zip(chosen, bounds, bounds[1:], strict=False)
        )

    splits = [
        [0, *c, m.n_blocks] for c in itertools.combinations(range(1, m.n_blocks), len(chosen) - 1)
    ]
    best = min(slowest(bounds) for bounds in splits if fits(bounds))
    step = min(cum[i + 1] - cum[i] for i in range(m.n_blocks))
    assert slowest(plan.bounds()) <= best + step / (2 * max(speed[n] for n in chosen)) + 1e-9


def test_a_2000_block_model_on_10_nodes_is_shared_in_proportion_to_speed():
    """Every budget has room for its share here, so each boundary is near the proportional
    target: the model's work in blocks (2000, plus the tied head's, one block's worth) times
    the speeds so far over all speeds; and no stage takes a block's time more than the ideal."""
    m = model([32] * 2000, embed=64, head=32)
    speeds = [1.0 + 0.1 * k for k in range(10)]
    nodes = [NodeCapacity(i, 10**6, s) for i, s in zip(IDS, speeds, strict=True)]
    plan = plan_stages(m, nodes, kv_bytes_per_block=32)
    assert [s.node_id for s in plan.stages] == IDS
    so_far = list(itertools.accumulate(speeds))
    want = [0] + [min(2000, round(2001 * s / so_far[-1])) for s in so_far]
    assert all(abs(b - w) <= 1 for b, w in zip(plan.bounds(), want, strict=True))
    ideal = 2001 / so_far[-1]  # in blocks' time
    for stage, speed in zip(plan.stages, speeds, strict=True):
        blocks = stage.end - stage.start + (stage.end == 2000)  # the head: one block's worth
        assert blocks / speed <= ideal + 1 / speed
        assert stage.weight_bytes == cost(m, stage)
    assert plan_stages(m, nodes[::-1], kv_bytes_per_block=32) == plan  # order does not matter


# ---- Plan JSON and describe ----------------------------------------------------------------


def a_plan():
    m = model([256] * 6, embed=512, head=64)
    nodes = [NodeCapacity(IDS[0], 2000), NodeCapacity(IDS[1], 4000)]
    return plan_stages(m, nodes)


def test_plan_json_round_trip():
    plan = a_plan()
    doc = plan.to_json()
    assert doc["format"] == "omninode/plan/1"
    assert Plan.from_json(json.loads(json.dumps(doc))) == plan


def _mutations():
    def edit(fn):
        def apply(doc):
            fn(doc)
            return doc

        return apply

    s = "stages"
    return [
        ("not an object", lambda doc: [doc]),
        ("extra key", edit(lambda d: d.update(extra=1))),
        ("missing key", edit(lambda d: d.pop("n_blocks"))),
        ("format", edit(lambda d: d.update(format="omninode/plan/2"))),
        ("bad model id", edit(lambda d: d.update(model_id="bafkr4inope"))),
        ("bool n_blocks", edit(lambda d: d.update(n_blocks=True))),
        ("n_blocks too large", edit(lambda d: d.update(n_blocks=10**6))),
        ("no stages", edit(lambda d: d.update(stages=[]))),
        ("stages not a list", edit(lambda d: d.update(stages={"0": 1}))),
        ("gap", edit(lambda d: d[s][1].update(start=d[s][1]["start"] + 1))),
        ("overlap", edit(lambda d: d[s][1].update(start=d[s][1]["start"] - 1))),
        ("short", edit(lambda d: d[s][-1].update(end=d[s][-1]["end"] - 1))),
        ("past the end", edit(lambda d: d.update(n_blocks=d["n_blocks"] - 1))),
        ("empty stage", edit(lambda d: d[s][0].update(end=0))),
        ("float start", edit(lambda d: d[s][1].update(start=float(d[s][1]["start"])))),
        ("string end", edit(lambda d: d[s][0].update(end=str(d[s][0]["end"])))),
        ("negative bytes", edit(lambda d: d[s][0].update(weight_bytes=-1))),
        ("bad node id", edit(lambda d: d[s][0].update(node_id="omni1" + "9" * 52))),
        ("repeated node", edit(lambda d: d[s][1].update(node_id=d[s][0]["node_id"]))),
        ("stage extra key", edit(lambda d: d[s][0].update(cid="x"))),
        ("stage not an object", edit(lambda d: d[s].__setitem__(0, [0, 1]))),
    ]


@pytest.mark.parametrize("what, mutate", _mutations(), ids=[m[0] for m in _mutations()])
def test_plan_from_json_refuses(what, mutate):
    doc = mutate(json.loads(json.dumps(a_plan().to_json())))
    with pytest.raises(PlanError):
        Plan.from_json(doc)


def test_plan_constructor_checks_invariants():
    plan = a_plan()
    broken = (StageAssignment(IDS[0], 0, 2, 10), StageAssignment(IDS[1], 3, 6, 10))
    with pytest.raises(PlanError, match="starts at block 3"):
        Plan(plan.model_id, 6, broken)


def test_describe_is_one_line_per_stage():
    plan = a_plan()
    text = describe(plan, {IDS[1]: "studio"})
    lines = text.splitlines()
    assert len(lines) == len(plan.stages) == 2
    assert "embed" in lines[0] and "head" not in lines[0]
    assert "head" in lines[1] and "studio" in lines[1]
    assert IDS[0][:16] in lines[0]
    assert "MiB" in lines[0]
    b = plan.bounds()
    assert f"{b[0]}-{b[1] - 1}" in lines[0]
