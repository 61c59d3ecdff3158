"""Prefill and decode speed of one OmniNode stage holding a whole model, next to llama.cpp.

    python bench/engine.py [--model NAME_OR_GGUF] [--runs N] [--blas auto|bundled|PATH]
                           [--engine default|ggml|both] [--threads N]

Prefill: one forward of a ~128-token prompt (fresh sequence each run), tokens per second.
Decode: 128 greedy tokens one at a time after that prompt, tokens per second. Each figure is
the median over --runs runs, after one warm-up run that is not counted.

On a Linux CPU the stage computes on NumPy's OpenBLAS by default (llm_omninode/backend/blas.py
and host_step.py); OMNI_BLAS=mlx measures MLX's own kernels instead, OMNI_DECODE_THREADS=0
decodes on all BLAS threads (faster on an idle machine, much slower on a busy one).

``--engine ggml`` measures the ggml stage instead (backend/ggml_stage.py: ggml's own kernels on
the GGUF bytes, OMNI_ENGINE=ggml in the shim); ``--engine both`` runs each engine in a process
of its own and prints them side by side, with each one's weights and peak resident memory
(VmHWM, and its growth from before the stage was loaded).

llama.cpp is measured the same way when the ``llama_cpp`` module can be imported (it is never
a dependency; --llama-python names another interpreter that has it). Otherwise the ratios use
llama.cpp's figures measured for SmolLM2-135M Q4_1 on the project's reference machine
(2-core x86-64), labelled as such. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# llama.cpp (llama-cpp-python, 2 threads) on the reference machine: 2-core AMD EPYC VM,
# SmolLM2-135M-Instruct Q4_1. Used only when llama_cpp cannot be run here.
REFERENCE_LLAMA_CPP = {"prefill_tok_s": 189.0, "decode_tok_s": 72.0}
DEFAULT_MODEL = "smollm2"
PROMPT_TOKENS = 128
DECODE_TOKENS = 128
# Plain prose so the tokenizer sees ordinary text; repeated until it is long enough.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps out "
    "of habit, and lit the great lamp as the fishing boats turned for home across the bay. "
)


# ---- BLAS -----------------------------------------------------------------------------------
# MLX's CPU matmul calls cblas_sgemm. The symbol is resolved through the global scope first,
# so a BLAS loaded with RTLD_GLOBAL before mlx is imported replaces the reference BLAS that
# the mlx-cpu wheel bundles (the same effect as LD_PRELOAD, without re-executing).
BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",  # Debian libblis4-pthread
    "/usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",  # Debian libopenblas0-*
    "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def preload_blas(choice: str) -> str | None:
    """Load a BLAS globally before mlx is imported; returns the path loaded, if any."""
    if choice == "bundled":
        return None
    if "mlx" in sys.modules:
        raise RuntimeError("a BLAS must be loaded before mlx is imported")
    paths = BLAS_CANDIDATES if choice == "auto" else (choice,)
    for path in paths:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    if choice != "auto":
        raise FileNotFoundError(choice)
    return None


def blas_in_use() -> str:
    """The library that provides the cblas_sgemm MLX's calls bind to (after mlx is loaded)."""

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    try:
        libdl = ctypes.CDLL(None)
        # the global scope as MLX sees it: preloaded and RTLD_GLOBAL objects come first
        addr = ctypes.cast(libdl.cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        # not in the global scope: MLX binds to the BLAS it links (the wheel's own)
        return _mlx_linked_blas()
    info = DlInfo()
    if not libdl.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)):
        return "unknown"
    return os.fsdecode(info.dli_fname)


def _mlx_linked_blas() -> str:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = line.split()[-1]
                if "mlx_cpu.libs/libblas" in name:
                    return name + " (reference BLAS bundled with mlx-cpu)"
    except OSError:
        pass
    return "linked by mlx (Accelerate on macOS)"


def compute_path(stage: Any) -> str:
    """Where the stage computes: ggml, MLX kernels, or NumPy's BLAS (backend/blas.py)."""
    if hasattr(stage, "flash_attn"):  # a GgmlStage
        import ggml

        llamafile = "on" if ggml.ggml_cpu_has_llamafile() else "off"
        return (
            f"ggml-python {ggml.__version__} CPU kernels on the GGUF bytes, {stage.threads} "
            f"threads, llamafile sgemm {llamafile}"
        )
    if not getattr(stage, "host_blas", False):
        return "MLX (quantized matmuls; OMNI_BLAS=mlx or not a Linux CPU)"
    import numpy as np

    try:
        blas_cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        lib = f"{blas_cfg['name']} {blas_cfg.get('version', '')}".strip()
    except (KeyError, TypeError):
        lib = "NumPy's BLAS"
    steps = "NumPy steps" if getattr(stage, "host_step", False) else "MLX ops"
    from llm_omninode.backend.qmatvec import PackedWeight

    kinds = {type(lin.weight) for lin in stage._linears()}
    if PackedWeight in kinds:
        weights = f"packed quantized projections (Numba matvec; prompts dequantize into {lib})"
    else:
        weights = f"dense float32 projections on {lib} (via NumPy)"
    return f"{weights}, {steps}"


# ---- loading --------------------------------------------------------------------------------
def stage_class(engine: str, threads: int | None) -> Any:
    """The stage constructor of ``engine`` ("default": engine.Stage, "ggml": GgmlStage)."""
    if engine == "ggml":
        import functools

        from llm_omninode.backend.ggml_stage import GgmlStage

        return functools.partial(GgmlStage, threads=threads)
    from llm_omninode.backend.engine import Stage

    return Stage


def load_stage(
    model: str, engine: str = "default", threads: int | None = None
) -> tuple[Any, Any, str | None, str]:
    """(stage, tokenizer, gguf_path, label) for a GGUF file or a model name in the registry."""
    from llm_omninode.backend.spec import ModelSpec
    from llm_omninode.backend.tokenizer import Tokenizer

    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        from llm_omninode.backend.engine import TensorData
        from llm_omninode.backend.gguf import open_gguf

        gguf = open_gguf(path)
        spec = ModelSpec.from_metadata(gguf.metadata, gguf.tensors.keys())
        tensors = {
            name: TensorData(name, t.ggml_type, t.shape, gguf.tensor_data(name))
            for name, t in gguf.tensors.items()
        }
        stage = stage_class(engine, threads)(spec, tensors, 0, spec.n_blocks)
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        del tensors
        return stage, tokenizer, str(path), path.name

    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.runtime import stage_tensors
    from llm_omninode.home import omni_home

    registry = ModelRegistry(omni_home())
    record = registry.get(model)
    manifest = record.manifest
    spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
    tensors = stage_tensors(registry.store, manifest, 0, spec.n_blocks, record.model_id)
    stage = stage_class(engine, threads)(spec, tensors, 0, spec.n_blocks)
    del tensors
    source = registry.store.file_source(record.model_id)
    label = f"{model} ({record.model_id[:16]})"
    return stage, Tokenizer.from_metadata(manifest.metadata), source and source.path, label


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    text = PROMPT_TEXT
    while True:
        ids = tokenizer.encode(text, add_special=True)
        if len(ids) >= n:
            return ids[:n]
        text += PROMPT_TEXT


# ---- measuring ------------------------------------------------------------------------------
def measure(prefill: Any, decode: Any, ids: list[int], n_decode: int, runs: int) -> dict[str, Any]:
    """Medians over ``runs`` of prefill(ids) and of n_decode decode steps; one warm-up first.

    ``prefill(ids) -> logits`` starts a fresh sequence; ``decode(token) -> logits`` appends.
    """
    import numpy as np

    pf_times, dc_times, pf_cpu, dc_cpu = [], [], [], []
    for run in range(runs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        logits = prefill(ids)
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(n_decode):
            logits = decode(int(np.argmax(logits)))
        t2, c2 = time.perf_counter(), time.process_time()
        if run:  # run 0 warms up (allocations, thread pools, first-touch of weights)
            pf_times.append(t1 - t0)
            dc_times.append(t2 - t1)
            pf_cpu.append(c1 - c0)
            dc_cpu.append(c2 - c1)
    pf, dc = statistics.median(pf_times), statistics.median(dc_times)
    return {
        "prefill_tok_s": round(len(ids) / pf, 2),
        "decode_tok_s": round(n_decode / dc, 2),
        "prefill_ms": [round(t * 1e3, 1) for t in pf_times],
        "decode_ms_per_tok": [round(t / n_decode * 1e3, 2) for t in dc_times],
        # CPU seconds of all the process's threads: on a busy machine, what a run costs
        # whatever the wait for a core (threads that spin at barriers count too)
        "prefill_tok_per_cpu_s": round(len(ids) / statistics.median(pf_cpu), 2),
        "decode_tok_per_cpu_s": round(n_decode / statistics.median(dc_cpu), 2),
    }


def bench_omninode(stage: Any, ids: list[int], n_decode: int, runs: int) -> dict[str, Any]:
    import numpy as np

    state = {"seq": None, "n": 0}

    def prefill(tokens: list[int]) -> Any:
        if state["seq"] is not None:
            stage.free(state["seq"])
        state["n"] += 1
        state["seq"] = f"bench-{state['n']}"
        return stage.forward(state["seq"], np.asarray(tokens, dtype=np.int32))

    def decode(token: int) -> Any:
        return stage.forward(state["seq"], np.asarray([token], dtype=np.int32))

    result = measure(prefill, decode, ids, n_decode, runs)
    stage.free(state["seq"])
    return result


def bench_llama_cpp(gguf_path: str, ids: list[int], n_decode: int, runs: int) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    n_threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(
        model_path=gguf_path,
        n_ctx=max(512, len(ids) + n_decode + 8),
        n_batch=512,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )

    def prefill(tokens: list[int]) -> Any:
        llm.reset()
        llm.eval(tokens)
        return llm.scores[llm.n_tokens - 1]

    def decode(token: int) -> Any:
        llm.eval([token])
        return np.asarray(llm.scores[llm.n_tokens - 1])

    result = measure(prefill, decode, ids, n_decode, runs)
    result["version"] = getattr(llama_cpp, "__version__", "?")
    result["threads"] = n_threads
    return result


def llama_cpp_figures(
    gguf_path: str | None, ids: list[int], n_decode: int, runs: int, python: str | None
) -> dict[str, Any]:
    """Measured llama.cpp figures if it can run here, else the labelled reference figures."""
    why = "no GGUF file path for llama.cpp"
    if gguf_path:
        if python:
            return _llama_cpp_subprocess(python, gguf_path, ids, n_decode, runs)
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            why = "llama_cpp is not importable (pip install llama-cpp-python, or --llama-python)"
        else:
            out = bench_llama_cpp(gguf_path, ids, n_decode, runs)
            out["source"] = "measured here"
            return out
    return dict(REFERENCE_LLAMA_CPP, source=f"reference figures, not measured here ({why})")


def _llama_cpp_subprocess(
    python: str, gguf_path: str, ids: list[int], n_decode: int, runs: int
) -> dict[str, Any]:
    args = {"gguf": gguf_path, "ids": ids, "n_decode": n_decode, "runs": runs}
    proc = subprocess.run(
        [python, __file__, "--llama-worker", json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp run with {python} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["source"] = f"measured here ({python})"
    return out


# ---- memory and engines side by side ----------------------------------------------------------
def memory_status() -> dict[str, float]:
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


def compare_engines(argv: list[str]) -> int:
    """Run this script once per engine, each in its own process; print them side by side."""
    results = {}
    for engine in ("default", "ggml"):
        cmd = [sys.executable, __file__, *argv, "--engine", engine]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise RuntimeError(f"--engine {engine} failed")
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [("", "default", "ggml")]
    figures = (
        ("prefill tok/s", lambda r: r["omninode"]["prefill_tok_s"]),
        ("decode tok/s", lambda r: r["omninode"]["decode_tok_s"]),
        ("prefill tok/cpu-s", lambda r: r["omninode"]["prefill_tok_per_cpu_s"]),
        ("decode tok/cpu-s", lambda r: r["omninode"]["decode_tok_per_cpu_s"]),
        ("weights MB", lambda r: r["stage_weights_mb"]),
        ("peak RSS MB", lambda r: r["memory_mb"]["VmHWM"]),
        ("RSS growth MB", lambda r: r["rss_growth_mb"]),
        ("load s", lambda r: r["load_s"]),
    )
    for name, get in figures:
        rows.append((name, *(str(get(results[e])) for e in ("default", "ggml"))))
    print(f"\n{results['default']['model']} ({results['default']['machine']})")
    for e in ("default", "ggml"):
        print(f"  {e}: {results[e]['path']}")
    for name, a, b in rows:
        print(f"  {name:<16}{a:>12}{b:>12}")
    ref = results["default"]["llama_cpp"]
    print(f"  llama.cpp ({ref['source']}): {ref['prefill_tok_s']} / {ref['decode_tok_s']} tok/s")
    print(json.dumps(results))
    return 0


# ---- report ---------------------------------------------------------------------------------
def report(omni: dict[str, Any], ref: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    ratios = {
        "prefill": round(omni["prefill_tok_s"] / ref["prefill_tok_s"], 3),
        "decode": round(omni["decode_tok_s"] / ref["decode_tok_s"], 3),
    }
    rows = [
        ("", "prefill tok/s", "decode tok/s"),
        ("OmniNode", f"{omni['prefill_tok_s']:.1f}", f"{omni['decode_tok_s']:.1f}"),
        ("llama.cpp", f"{ref['prefill_tok_s']:.1f}", f"{ref['decode_tok_s']:.1f}"),
        ("ratio", f"{ratios['prefill']:.2f}x", f"{ratios['decode']:.2f}x"),
    ]
    print()
    for key, value in meta.items():
        print(f"{key:>16}: {value}")
    print(f"{'llama.cpp':>16}: {ref['source']}")
    print()
    for name, a, b in rows:
        print(f"  {name:<16}{a:>15}{b:>15}")
    print()
    print(
        f"  OmniNode runs: prefill ms {omni['prefill_ms']}, decode ms/token "
        f"{omni['decode_ms_per_tok']}"
    )
    return {"omninode": omni, "llama_cpp": ref, "ratio": ratios, **meta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path or registry model name")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (median), after a warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument(
        "--blas",
        default="default",
        help="what MLX's own cblas_sgemm binds to (used only with OMNI_BLAS=mlx, see "
        "llm_omninode/backend/blas.py). default/bundled: the wheel's; auto: the first system "
        "BLIS/OpenBLAS found, loaded before mlx; or a path to a libblas with cblas_sgemm",
    )
    ap.add_argument(
        "--engine",
        choices=("default", "ggml", "both"),
        default="default",
        help="default: engine.Stage; ggml: ggml_stage.GgmlStage (OMNI_ENGINE=ggml); both: "
        "each in its own process, side by side",
    )
    ap.add_argument("--threads", type=int, help="ggml threads (default: every CPU)")
    ap.add_argument("--llama-python", help="interpreter that has llama_cpp (optional)")
    ap.add_argument("--no-llama", action="store_true", help="use the reference figures")
    ap.add_argument("--llama-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.llama_worker:  # child process: only llama_cpp and numpy are needed here
        job = json.loads(args.llama_worker)
        out = bench_llama_cpp(job["gguf"], job["ids"], job["n_decode"], job["runs"])
        print(json.dumps(out))
        return 0
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.engine == "both":
        rest = list(argv if argv is not None else sys.argv[1:])
        if "--engine" in rest:
            i = rest.index("--engine")
            del rest[i : i + 2]
        rest = [a for a in rest if not a.startswith("--engine=")]
        return compare_engines(rest)

    preloaded = None if args.blas == "default" else preload_blas(args.blas)
    before = memory_status()
    t0 = time.perf_counter()
    try:
        stage, tokenizer, gguf_path, label = load_stage(args.model, args.engine, args.threads)
    except LookupError as exc:  # registry.ModelNotFound
        print(f"{exc}\n(pull it with `llm omni pull smollm2`, or pass --model FILE.gguf)")
        return 2
    load_s = time.perf_counter() - t0
    ids = prompt_ids(tokenizer, args.prompt_tokens)

    import mlx.core as mx

    meta = {
        "model": label,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "mlx": f"{mx.__version__} on {mx.default_device()}",
        "path": compute_path(stage),
        "mlx_blas": blas_in_use() + (f" (preloaded by --blas {args.blas})" if preloaded else ""),
        "load_s": round(load_s, 2),
        "stage_weights_mb": round(getattr(stage, "nbytes", 0) / 1e6, 1),
        "prompt_tokens": len(ids),
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "engine": args.engine,
    }
    omni = bench_omninode(stage, ids, args.decode_tokens, args.runs)
    meta["memory_mb"] = memory_status()
    if before and meta["memory_mb"]:
        meta["rss_growth_mb"] = round(meta["memory_mb"]["VmHWM"] - before["VmRSS"], 1)
    if args.no_llama:
        ref = dict(REFERENCE_LLAMA_CPP, source="reference figures, not measured here (--no-llama)")
    else:
        ref = llama_cpp_figures(gguf_path, ids, args.decode_tokens, args.runs, args.llama_python)
    result = report(omni, ref, meta)
    if "mlx-cpu" in meta["mlx_blas"] and args.engine == "default" and not stage.host_blas:
        print(
            "  note: the projections run on the reference BLAS bundled with mlx-cpu (slow); "
            "the default (OMNI_BLAS unset) moves them to NumPy's OpenBLAS"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
