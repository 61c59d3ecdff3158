"""Concurrency: aggregate decode throughput of 1 vs N concurrent requests on a 2-stage split.

Starts 2 real ``omni-shim`` processes on loopback (bench/pipeline.py's Cluster), warms the plan
up, then runs ``--runs`` rounds of 1 request and of ``--concurrent`` requests at once, each
greedy with ``--decode-tokens`` tokens, through the plugin's QUIC client, one thread each.
Aggregate throughput is the tokens all requests generated divided by the round's wall time
(prefill included: that is what users of a busy node get). The last line is JSON.

    .venv/bin/python bench/concurrency.py [--concurrent 4] [--runs 3] [--decode-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline import find_model, running

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a robot who learns to paint.",
    "List five facts about the moon.",
    "Describe a busy market in the morning.",
    "Why do cats purr?",
    "Give three tips for learning a language.",
    "What makes bread rise?",
    "Describe the water cycle.",
]


def run_round(n: int, decode_tokens: int) -> tuple[float, int]:
    """(wall seconds, tokens generated) of ``n`` requests at once."""
    from llm_omninode.backend.sampling import SamplingOptions
    from llm_omninode.client import ShimClient
    from llm_omninode.request import GenerationRequest

    options = SamplingOptions().updated(temperature=0.0, repeat_penalty=1.0)

    def one(k: int) -> int:
        request = GenerationRequest(model="smollm2", prompt=PROMPTS[k % len(PROMPTS)],
                                    options=options, max_tokens=decode_tokens)  # fmt: skip
        with ShimClient.connect(start=False) as client:
            return list(client.generate(request))[-1].completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(one, range(n)))
    return time.perf_counter() - t0, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the pulled SmolLM2)")
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    model = find_model(args.model)
    with running(2, model):  # the rounds connect clients of their own
        run_round(1, 4)  # plan, load and fetch both stages
        single, many = [], []
        for _ in range(args.runs):
            wall, tokens = run_round(1, args.decode_tokens)
            single.append(tokens / wall)
            wall, tokens = run_round(args.concurrent, args.decode_tokens)
            many.append(tokens / wall)
            print(f"1 request {single[-1]:.1f} tok/s; {args.concurrent} at once "
                  f"{many[-1]:.1f} tok/s in all", flush=True)  # fmt: skip
    one, n = statistics.median(single), statistics.median(many)
    result = {
        "stages": 2,
        "concurrent": args.concurrent,
        "decode_tokens": args.decode_tokens,
        "single_tok_s": round(one, 2),
        "concurrent_tok_s": round(n, 2),
        "ratio": round(n / one, 3),
        "goal_ratio": 1.8,
    }
    print(f"aggregate {args.concurrent} vs 1: {result['ratio']}x (goal 1.8x)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
