"""First token of a long prompt on a 2-stage split: pipelined pieces vs the whole prompt at once.

A prompt of ~1,000 tokens goes to a real 2-shim cluster on loopback (bench/pipeline.py's
Cluster, each shim on its share of the cores) twice over: once as the coordinator sends it by
default, in pieces of 256 tokens that each stage passes on while it computes the next
(shim/pipeline.py), and once with OMNI_PREFILL_PIECE=0, the whole prompt in one step, so stage
1 starts only when stage 0 has finished. The figure is the coordinator's prefill time (prompt
in, first token out), median over --runs; the last line is JSON with the ratio.

    .venv/bin/python bench/prefill.py [--runs 3] [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline import PROMPT, find_model, running


def measure(model: Path, piece: int, prompt: str, runs: int) -> dict:
    from llm_omninode.backend.sampling import SamplingOptions
    from llm_omninode.request import GenerationRequest

    request = GenerationRequest(model="smollm2", prompt=prompt, max_tokens=1,
                                options=SamplingOptions().updated(temperature=0.0))  # fmt: skip
    with running(2, model, env={"OMNI_PREFILL_PIECE": str(piece)}) as client:
        list(client.generate(request))  # plan, load and fetch both stages
        times, first = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            last = list(client.generate(request))[-1]
            first.append(time.perf_counter() - t0)
            times.append((last.timings or {})["prefill_s"])
    return {
        "piece": piece or None,
        "prompt_tokens": last.prompt_tokens,
        "prefill_s": round(statistics.median(times), 3),
        "client_first_token_s": round(statistics.median(first), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the pulled SmolLM2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10, help="copies of the base prompt")
    ap.add_argument("--piece", type=int, default=256)
    args = ap.parse_args(argv)
    model = find_model(args.model)
    prompt = " ".join([PROMPT] * args.repeat)
    whole = measure(model, 0, prompt, args.runs)
    print(f"whole prompt ({whole['prompt_tokens']} tokens): first token after "
          f"{whole['prefill_s']} s", flush=True)  # fmt: skip
    pieces = measure(model, args.piece, prompt, args.runs)
    print(f"pieces of {args.piece}: first token after {pieces['prefill_s']} s", flush=True)
    ratio = round(whole["prefill_s"] / pieces["prefill_s"], 3)
    print(f"first token {ratio}x sooner in pieces")
    print(json.dumps({"stages": 2, "whole": whole, "pieces": pieces, "speedup": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
