"""The coordinator's table of parked sequences: which cache a new prompt continues from."""

from __future__ import annotations

from types import SimpleNamespace

from omninode_shim.prefixes import MIN_REUSE, PrefixTable, common_prefix


def plan(*bounds: int, node: str = "n"):
    stages = [SimpleNamespace(node_id=f"{node}{i}", start=a, end=b)
              for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]  # fmt: skip
    return SimpleNamespace(stages=stages)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4], limit=10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], limit=10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], limit=2) == 2
    assert common_prefix([], [1], limit=5) == 0


def test_the_longest_prefix_on_the_same_plan_is_taken_once():
    table = PrefixTable()
    turn = list(range(100, 140))
    table.park("short", "m", plan(0, 15, 30), turn[:20])
    table.park("long", "m", plan(0, 15, 30), turn[:35])
    table.park("other-model", "x", plan(0, 15, 30), turn)
    table.park("other-plan", "m", plan(0, 10, 30), turn)
    reuse = table.take("m", plan(0, 15, 30), [*turn, 7, 8])
    assert (reuse.seq, reuse.keep) == ("long", 35)
    again = table.take("m", plan(0, 15, 30), [*turn, 7, 8])
    assert (again.seq, again.keep) == ("short", 20)  # "long" was consumed


def test_at_least_one_token_is_left_and_short_prefixes_are_not_worth_it():
    table = PrefixTable()
    ids = list(range(50))
    table.park("a", "m", plan(0, 30), ids)
    assert table.take("m", plan(0, 30), ids).keep == len(ids) - 1  # its logits pick a token
    table.park("b", "m", plan(0, 30), ids[: MIN_REUSE - 1])
    assert table.take("m", plan(0, 30), ids) is None


def test_disabled_parks_nothing():
    table = PrefixTable(enabled=False)
    table.park("a", "m", plan(0, 30), list(range(50)))
    assert table.take("m", plan(0, 30), list(range(60))) is None
