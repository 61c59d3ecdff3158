"""Failover stall: 3 real shims on loopback split SmolLM2; a client streams a greedy answer
through node 0's Ollama API; a node holding another stage is killed (SIGKILL) or frozen
(SIGSTOP) mid-decode. The stall is the longest gap between streamed tokens after the signal
(tests/support/failover.py). Every run's text is checked against the no-failure text. Medians of
``--runs``; the last line is JSON.

    .venv/bin/python bench/failover.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.failover import PROMPT, restore, stream_with_fault  # noqa: E402
from support.shim_cluster import ShimCluster  # noqa: E402

from llm_omninode.backend.registry import ModelRegistry  # noqa: E402

TOKENS = 120
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP}


def find_model() -> Path:
    from llm_omninode.home import omni_home

    found = omni_home() / "files" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not found.is_file():
        sys.exit("SmolLM2 not found: run `make model` (llm omni pull smollm2)")
    return found


def _victim(cluster: ShimCluster) -> int:
    """A node other than the coordinator that holds a stage of the current plan."""
    status = json.loads(cluster.llm("omni", "status", "--json"))
    (plan,) = [p for p in status["plans"] if p["ready"]]
    holders = [cluster.node_ids.index(s["node_id"]) for s in plan["stages"]]
    if len(holders) != cluster.n:
        raise RuntimeError(f"the plan does not span all {cluster.n} nodes: {holders}")
    return next(i for i in holders if i != 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    model = find_model()
    results: dict[str, list[float]] = {name: [] for name in SIGNALS}
    tmp = tempfile.TemporaryDirectory(prefix="omni-failover-")
    with tmp, ShimCluster(Path(tmp.name), 3) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(model, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(3)
        import ollama

        client = ollama.Client(host=cluster.api_url(0))
        options = {"temperature": 0, "num_predict": TOKENS}
        want = client.generate(model="smollm2", prompt=PROMPT, options=options).response
        for name, sig in SIGNALS.items():
            for run in range(args.runs):
                client.generate(model="smollm2", prompt="Hi", options={"num_predict": 1})
                victim = _victim(cluster)
                got = stream_with_fault(cluster, 0, victim, sig, tokens=TOKENS)
                same = got.error is None and got.text == want
                print(f"{name} run {run + 1}: node{victim}, stall {got.stall_s:.2f} s, "
                      f"text {'same' if same else 'DIFFERENT: ' + (got.error or '')}",
                      flush=True)  # fmt: skip
                if not same:
                    raise SystemExit("a failover changed the text")
                results[name].append(got.stall_s)
                restore(cluster, victim, sig)
    summary = {
        f"{name.lower()}_stall_s": round(statistics.median(v), 3) for name, v in results.items()
    }
    summary |= {f"{name.lower()}_runs": [round(x, 3) for x in v] for name, v in results.items()}
    print(f"median stall: SIGKILL {summary['sigkill_stall_s']} s, "
          f"SIGSTOP {summary['sigstop_stall_s']} s")  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
