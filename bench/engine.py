"""Prefill and decode speed, weights and peak memory of one OmniNode stage holding a whole
model, side by side with llama.cpp in the same run, for each model asked for.

    python bench/engine.py [--models smollm2,qwen2.5-coder-1.5b] [--runs N] [--threads N]
                           [--engine ggml|mlx] [--llama-python PATH]

Prefill: one forward of a ~128-token prompt (a fresh sequence each run), tokens per second.
Decode: 128 greedy tokens one at a time after that prompt, tokens per second. Each figure is
the median over --runs runs, after one warm-up run that is not counted. Both sides use the
same number of threads (default: every CPU) and libgomp's default waits (its threads spin
~3 ms at ggml's barriers, as in a shim; OMP_WAIT_POLICY, when set, reaches both).

Each measurement runs in a process of its own, so its peak resident memory (VmHWM) is its
own: OmniNode's stage (the engine a shim uses here: ggml on Linux) and llama.cpp
(llama-cpp-python, never a project dependency: `make llama-ref` builds 0.3.36 into
.llama-venv, which is used when present; --llama-python names another interpreter). Without
llama.cpp the OmniNode figures are printed alone. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODELS = "smollm2,qwen2.5-coder-1.5b"
PROMPT_TOKENS = 128
DECODE_TOKENS = 128
LLAMA_VENV = Path(__file__).resolve().parent.parent / ".llama-venv" / "bin" / "python"
# Plain prose so the tokenizer sees ordinary text; repeated until it is long enough.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps out "
    "of habit, and lit the great lamp as the fishing boats turned for home across the bay. "
)


def memory_mb() -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile of this process in MB (Linux; else empty)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def measure(prefill: Any, decode: Any, ids: list[int], n_decode: int, runs: int) -> dict[str, Any]:
    """Medians over ``runs`` of prefill(ids) and of n_decode decode steps; one warm-up first.

    ``prefill(ids) -> logits`` starts a fresh sequence; ``decode(token) -> logits`` appends.
    """
    import numpy as np

    pf_times, dc_times = [], []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        logits = prefill(ids)
        t1 = time.perf_counter()
        for _ in range(n_decode):
            logits = decode(int(np.argmax(logits)))
        t2 = time.perf_counter()
        if run:  # run 0 warms up (allocations, thread pools, first touch of the weights)
            pf_times.append(t1 - t0)
            dc_times.append(t2 - t1)
    return {
        "prefill_tok_s": round(len(ids) / statistics.median(pf_times), 2),
        "decode_tok_s": round(n_decode / statistics.median(dc_times), 2),
        "prefill_ms": [round(t * 1e3, 1) for t in pf_times],
        "decode_ms_per_tok": [round(t / n_decode * 1e3, 2) for t in dc_times],
    }


# ---- workers (each in a process of its own) -------------------------------------------------
def omninode_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Load the model as one stage of the engine a shim would use, measure it."""
    import numpy as np

    os.environ["OMNI_ENGINE"] = job["engine"]
    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.spec import ModelSpec
    from llm_omninode.backend.stage_engine import engine_name, new_stage, stage_tensors
    from llm_omninode.backend.tokenizer import Tokenizer
    from llm_omninode.home import omni_home

    before = memory_mb()
    registry = ModelRegistry(omni_home())
    record = registry.get(job["model"])
    manifest = record.manifest
    spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
    t0 = time.perf_counter()
    tensors = stage_tensors(registry.store, manifest, 0, spec.n_blocks, record.model_id)
    kw = {"threads": job["threads"]} if engine_name() == "ggml" else {}
    stage = new_stage(spec, tensors, 0, spec.n_blocks, max_context=2048, **kw)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(Tokenizer.from_metadata(manifest.metadata), job["prompt_tokens"])
    state = {"n": 0}

    def prefill(tokens: list[int]) -> Any:
        if state["n"]:
            stage.free(f"bench-{state['n']}")
        state["n"] += 1
        return stage.forward(f"bench-{state['n']}", np.asarray(tokens, dtype=np.int32))

    def decode(token: int) -> Any:
        return stage.forward(f"bench-{state['n']}", np.asarray([token], dtype=np.int32))

    out = measure(prefill, decode, ids, job["decode_tokens"], job["runs"])
    source = registry.store.file_source(record.model_id)
    out.update(
        engine=engine_name(),
        threads=getattr(stage, "threads", None),
        load_s=round(load_s, 2),
        weights_mb=round(stage.nbytes / 1e6, 1),
        gguf_mb=round(sum(s.size for s in manifest.shards) / 1e6, 1),
        memory_mb=memory_mb(),
        rss_before_mb=before.get("VmRSS"),
        ids=ids,
        gguf=source.path if source else None,
    )
    return out


def llama_worker(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    ids, threads = job["ids"], job["threads"]
    llm = llama_cpp.Llama(
        model_path=job["gguf"],
        n_ctx=max(512, len(ids) + job["decode_tokens"] + 8),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def prefill(tokens: list[int]) -> Any:
        llm.reset()
        llm.eval(tokens)
        return llm.scores[llm.n_tokens - 1]

    def decode(token: int) -> Any:
        llm.eval([token])
        return np.asarray(llm.scores[llm.n_tokens - 1])

    out = measure(prefill, decode, ids, job["decode_tokens"], job["runs"])
    out.update(version=llama_cpp.__version__, threads=threads, memory_mb=memory_mb())
    return out


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    text = PROMPT_TEXT
    while True:
        ids = tokenizer.encode(text, add_special=True)
        if len(ids) >= n:
            return ids[:n]
        text += PROMPT_TEXT


def _child(python: str, role: str, job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [python, __file__, "--worker", role, json.dumps(job)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{role} worker ({python}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ---------------------------------------------------------------------------------
def bench_model(model: str, args: argparse.Namespace, llama: str | None) -> dict[str, Any]:
    job = {
        "model": model, "engine": args.engine, "threads": args.threads, "runs": args.runs,
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
    }  # fmt: skip
    omni = _child(sys.executable, "omninode", job)
    ids, gguf = omni.pop("ids"), omni.pop("gguf")
    result: dict[str, Any] = {"omninode": omni, "prompt_tokens": len(ids)}
    if llama and gguf:
        ref = _child(llama, "llama", {**job, "ids": ids, "gguf": gguf})
        result["llama_cpp"] = ref
        result["ratio"] = {
            k: round(omni[f"{k}_tok_s"] / ref[f"{k}_tok_s"], 3) for k in ("prefill", "decode")
        }
    return result


def print_model(model: str, r: dict[str, Any]) -> None:
    omni, ref = r["omninode"], r.get("llama_cpp")
    head = ("llama.cpp", "ratio") if ref else ("", "")
    rows = [("", f"OmniNode ({omni['engine']})", *head)]

    def row(name: str, key: str, fmt: str = "{:.1f}") -> None:
        a = fmt.format(omni[key])
        b = fmt.format(ref[key]) if ref else ""
        ratio = f"{r['ratio'][key.split('_')[0]]:.2f}x" if ref and key.endswith("tok_s") else ""
        rows.append((name, a, b, ratio))

    row("prefill tok/s", "prefill_tok_s")
    row("decode tok/s", "decode_tok_s")
    rows.append(("weights MB", f"{omni['weights_mb']:.1f}", f"(GGUF {omni['gguf_mb']:.1f})", ""))
    peak = (omni["memory_mb"].get("VmHWM"), ref["memory_mb"].get("VmHWM") if ref else None)
    rows.append(("peak RSS MB", str(peak[0]), str(peak[1] or ""), ""))
    print(f"\n{model}: {r['prompt_tokens']}-token prompt, {omni['threads']} threads")
    for name, a, b, c in rows:
        print(f"  {name:<16}{a:>20}{b:>18}{c:>8}")
    print(f"  OmniNode decode ms/token per run: {omni['decode_ms_per_tok']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="registry names, comma-separated")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (median), after a warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--engine", choices=("ggml", "mlx", "default"), default="default",
                    help="OmniNode's engine (default: the platform's: ggml on Linux)")  # fmt: skip
    ap.add_argument("--llama-python", help="interpreter with llama_cpp (default: .llama-venv)")
    ap.add_argument("--no-llama", action="store_true", help="OmniNode alone")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        role, job = args.worker[0], json.loads(args.worker[1])
        out = omninode_worker(job) if role == "omninode" else llama_worker(job)
        print(json.dumps(out))
        return 0
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    llama = None
    if not args.no_llama:
        llama = args.llama_python or (str(LLAMA_VENV) if LLAMA_VENV.exists() else None)
        if llama is None:
            print("llama.cpp: not measured (no .llama-venv: `make llama-ref`, or --llama-python)")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
    results: dict[str, Any] = {"machine": machine, "runs": args.runs, "models": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            r = bench_model(model, args, llama)
        except RuntimeError as exc:
            if "not found" not in str(exc):
                raise
            print(f"\n{model}: not pulled here (llm omni pull {model}); skipped")
            continue
        results["models"][model] = r
        print_model(model, r)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
