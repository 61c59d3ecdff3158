"""Qwen2.5-Coder-1.5B (1.0 GiB Q4_K_M) split over two shims whose --max-memory forces the
split: each one's peak resident memory, read from /proc, stays within its budget, and the
answer is the single-stage engine's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.shim_cluster import ShimCluster
from test_real_models_e2e import single_stage_answer

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.large_model, pytest.mark.cluster]
BUDGET_MIB = 900  # the whole model needs ~1.4 GiB planned, half of it ~0.8 GiB
CONTEXT = 1024
PROMPT = "Write a Python function that returns the square of a number."
N_TOKENS = 24


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out


def test_split_within_each_budget(qwen15_path: Path, tmp_path: Path) -> None:
    alias = "qwen2.5-coder-1.5b"
    with ShimCluster(
        tmp_path / "cluster", 2, max_memory=f"{BUDGET_MIB}MiB",
        extra_args=["--max-context", str(CONTEXT)],
    ) as cluster:  # fmt: skip
        ModelRegistry(cluster.dirs[0]).add_file(qwen15_path, alias=alias)
        cluster.start_all()
        cluster.wait_for_peers(2)
        got = cluster.llm(
            "-m", f"omni/{alias}", PROMPT, "-o", "temperature", "0",
            "-o", "max_tokens", str(N_TOKENS), "--no-log", timeout=900,
        ).rstrip("\n")  # fmt: skip
        (plan,) = json.loads(cluster.llm("omni", "status", "--json"))["plans"]
        stages = plan["stages"]
        assert len({s["node_id"] for s in stages}) == 2, stages
        peers = json.loads(cluster.llm("omni", "peers", "--json"))
        report = []
        for i, proc in enumerate(cluster.procs):
            assert proc is not None
            mem = _status_kib(proc.pid)
            row = next(r for r in peers if r["node_id"] == cluster.node_ids[i])
            planned = row["runtime"] + row["planned"]
            report.append(
                f"node{i}: planned {planned >> 20} MiB, VmRSS {mem['VmRSS'] >> 10} MiB, VmHWM "
                f"{mem['VmHWM'] >> 10} MiB (RssAnon {mem['RssAnon'] >> 10}, RssFile "
                f"{mem['RssFile'] >> 10}), budget {BUDGET_MIB} MiB"
            )
            assert planned <= BUDGET_MIB << 20, report
            assert mem["VmHWM"] <= BUDGET_MIB << 10, report
        print("\n" + "\n".join(report) + f"\nstages: {stages}\nanswer: {got!r}")
    want = single_stage_answer(qwen15_path, alias, PROMPT, tmp_path / "ref", N_TOKENS)
    assert got == want.rstrip("\n")
