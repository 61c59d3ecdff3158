"""What a JSON-schema constraint costs a token (backend/constraint.py), in one process.

For each model (SmolLM2's 49k vocabulary; qwen2.5-coder-0.5b's 152k where it is pulled):

- the token table's build time (once per model and last stage) and a schema's compile time;
- the pick alone, replaying a fixed answer's tokens: a greedy pick without and with the mask
  (llguidance's bitmask, unpacked, applied to a logits row), and the guide's advance, median
  microseconds a token (what the constraint adds to a token, without the model's noise);
- decoding with and without the schema, the same chat prompt, greedy, runs interleaved
  (plain, schema, plain, ...): the median decode step (forward + pick) of each, tokens a
  second, and the difference a token.

The last line is JSON.

    .venv/bin/python bench/constrained.py [--runs 3] [--tokens 64] [--models smollm2,qwen]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Make a shopping list of six things for a picnic, with how many of each, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 6,
            "maxItems": 6,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["name", "qty"],
            },
        }
    },
    "required": ["items"],
}
ANSWER = {"items": [{"name": n, "qty": q} for n, q in [
    ("bread", 2), ("cheese", 1), ("apples", 6), ("lemonade", 3), ("crisps", 4), ("grapes", 1),
]]}  # fmt: skip
MODELS = {
    "smollm2": ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen": ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
}


def find(name: str) -> Path | None:
    from llm_omninode.home import omni_home

    folder, file = MODELS[name]
    path = omni_home() / "files" / folder / file
    return path if path.is_file() else None


def guide_alone(model: Any, constraint: Any, reps: int = 5) -> dict[str, float]:
    """Median microseconds a token of a greedy pick without and with the guide (mask, then
    argmax), and of the guide's advance, replaying ANSWER's tokens on fixed random logits."""
    import numpy as np

    from llm_omninode.backend.sampling import Sampler, SamplingOptions

    sampler = Sampler(SamplingOptions.greedy())
    ids = model.tokenizer.encode(json.dumps(ANSWER), add_special=False)
    logits = np.random.default_rng(0).standard_normal(model.spec.vocab_size).astype(np.float32)
    plain, picks, advances = [], [], []
    for _ in range(reps):
        guide = model.guide(constraint)
        for token in ids:
            t0 = time.perf_counter()
            sampler.sample(logits)
            t1 = time.perf_counter()
            masked = guide.mask(logits)
            sampler.sample(masked)
            t2 = time.perf_counter()
            guide.advance(token)
            t3 = time.perf_counter()
            assert np.isfinite(masked[token]), "the answer left the schema"
            plain.append(t1 - t0)
            picks.append(t2 - t1)
            advances.append(t3 - t2)
    pick, plain_pick, advance = (statistics.median(x) * 1e6 for x in (picks, plain, advances))
    return {
        "answer_tokens": len(ids),
        "pick_us": plain_pick,
        "masked_pick_us": pick,
        "masked_pick_max_us": max(picks) * 1e6,
        "advance_us": advance,
        "overhead_us": pick + advance - plain_pick,
    }


def decode_steps(model: Any, request: Any) -> tuple[list[float], str]:
    """Each decode step's seconds (the prefill left out) and the text."""
    from llm_omninode.backend.generate import generate

    guide = None if request.constraint is None else model.guide(request.constraint)
    inner = functools.partial(model.next_token, guide=guide)
    times: list[float] = []

    def timed(seq: str, ids: Any, options: Any) -> int:
        t0 = time.perf_counter()
        token = inner(seq, ids, options)
        times.append(time.perf_counter() - t0)
        return token

    chunks = generate(timed, model.tokenizer, model.prompt_ids(request), options=request.options,
                      max_tokens=request.max_tokens, context_length=model.context_length,
                      free=model.free)  # fmt: skip
    text = "".join(c.text for c in chunks)
    return times[1:], text


def bench_model(name: str, path: Path, runs: int, tokens: int) -> dict[str, Any]:
    from llm_omninode.backend.constraint import Constraint
    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.sampling import SamplingOptions
    from llm_omninode.local_model import LocalModel
    from llm_omninode.request import GenerationRequest, Message

    registry = ModelRegistry(tempfile.mkdtemp(prefix="omni-bench-"))
    registry.add_file(path, alias=name)
    model = LocalModel.load(registry, name)
    constraint = Constraint.json_schema(SCHEMA)
    t0 = time.perf_counter()
    model.guide(constraint)  # builds the table and compiles
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.guide(Constraint.json_schema({**SCHEMA, "title": "another"}))  # compiles only
    compile_ms = (time.perf_counter() - t0) * 1e3
    alone = guide_alone(model, constraint)

    def request(constrained: bool) -> Any:
        return GenerationRequest(
            model=name, messages=(Message("user", PROMPT),), max_tokens=tokens,
            options=SamplingOptions.greedy(), constraint=constraint if constrained else None,
        )  # fmt: skip

    decode_steps(model, request(False))  # warm-up
    steps: dict[str, list[float]] = {"plain": [], "schema": []}
    texts = {}
    for _ in range(runs):
        for kind in ("plain", "schema"):
            times, texts[kind] = decode_steps(model, request(kind == "schema"))
            steps[kind].append(statistics.median(times))
    plain, schema = (statistics.median(steps[k]) for k in ("plain", "schema"))
    return {
        "vocab": model.spec.vocab_size,
        "table_s": round(table_s, 3),
        "compile_ms": round(compile_ms, 2),
        **{k: round(v, 1) for k, v in alone.items()},
        "decode_ms": {"plain": round(plain * 1e3, 3), "schema": round(schema * 1e3, 3)},
        "tok_s": {"plain": round(1 / plain, 1), "schema": round(1 / schema, 1)},
        "overhead_ms_per_token": round((schema - plain) * 1e3, 3),
        "overhead_ratio": round(schema / plain, 3),
        "schema_answer": texts["schema"][:200],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96, help="most tokens an answer decodes")
    parser.add_argument("--models", default="smollm2,qwen")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.models.split(","):
        path = find(name)
        if path is None:
            print(f"{name}: not pulled here (llm omni pull {MODELS[name][0]}); skipped")
            continue
        r = results[name] = bench_model(name, path, args.runs, args.tokens)
        print(
            f"\n{name}: vocabulary {r['vocab']}; token table {r['table_s']:.2f} s, "
            f"a schema compiles in {r['compile_ms']:.1f} ms"
        )
        print(
            f"  a greedy pick, over {r['answer_tokens']} tokens: {r['pick_us']:.0f} us plain, "
            f"{r['masked_pick_us']:.0f} us masked (max {r['masked_pick_max_us']:.0f}), "
            f"+{r['advance_us']:.0f} us to advance: {r['overhead_us']:.0f} us a token more"
        )
        print(
            f"  decode step, median of {args.runs} interleaved runs: plain "
            f"{r['decode_ms']['plain']:.2f} ms ({r['tok_s']['plain']} tok/s), schema "
            f"{r['decode_ms']['schema']:.2f} ms ({r['tok_s']['schema']} tok/s): "
            f"{r['overhead_ms_per_token']:+.3f} ms a token ({r['overhead_ratio']:.3f}x)"
        )
        print(f"  the schema's answer: {r['schema_answer'][:120]}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
