"""What a shim adds to a decode step: the bare ggml stage against the same model in a shim.

    python bench/overhead.py [--model qwen2.5-coder-1.5b] [--threads 2] [--runs 5]
                             [--decode-tokens 48] [--shims 1,2]

The sides stay loaded side by side and are measured in turn (A, B, A, B, ...), so a machine
others are loading weighs on both alike:

- engine: the stage the shim would run (stage_engine.new_stage, all blocks, ``--threads``) in
  a worker process of its own, decoding greedily after a short prompt;
- shims: for each size in ``--shims``, that many real ``omni-shim`` processes on loopback
  (the model split over them, the threads shared out: ``--shims 1,2`` sets one shim with 2
  threads beside two with 1 each), asked for the same greedy decode by a client here.

Wall time is what a busy machine blurs most, so beside tokens per second each side reports
CPU seconds per decoded token: the worker's (engine), or every shim process's and this
client's (from /proc/PID/stat, utime + stime, between the first streamed chunk and the last),
split by thread (``main``: the event loop; ``python``: the compute thread and ggml's OpenMP
workers). Medians over ``--runs`` after one warm-up each. Both
sides inherit one OpenMP wait policy (llm_omninode/backend/__init__.py). The last line
printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import Cluster  # noqa: E402

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | str, tid: int | str | None = None) -> float:
    """utime + stime of a process (or one of its threads) in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` by name (same-named threads summed)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            name = "main" if tid == str(pid) else name
            out[name] = out.get(name, 0.0) + cpu_s(pid, tid)
        except OSError:  # the thread ended meanwhile
            continue
    return out


# ---- the engine side: a worker process holding the stage ----------------------------------
def engine_worker(job: dict[str, Any]) -> None:
    """Load the stage, then for each line on stdin decode and print one JSON line."""
    import numpy as np

    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.spec import ModelSpec
    from llm_omninode.backend.stage_engine import new_stage, stage_tensors
    from llm_omninode.backend.tokenizer import Tokenizer
    from llm_omninode.home import omni_home

    registry = ModelRegistry(omni_home())
    record = registry.get(job["model"])
    manifest = record.manifest
    spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
    tensors = stage_tensors(registry.store, manifest, 0, spec.n_blocks, record.model_id)
    stage = new_stage(spec, tensors, 0, spec.n_blocks, max_context=2048, threads=job["threads"])
    ids = np.asarray(Tokenizer.from_metadata(manifest.metadata).encode(PROMPT), np.int32)
    print(json.dumps({"ready": True}), flush=True)
    for n, _ in enumerate(sys.stdin):
        seq = f"bench-{n}"
        logits = stage.forward(seq, ids)
        c0, t0 = cpu_s(os.getpid()), time.perf_counter()
        for _ in range(job["decode_tokens"]):
            logits = stage.forward(seq, np.asarray([int(np.argmax(logits))], np.int32))
        wall, cpu = time.perf_counter() - t0, cpu_s(os.getpid()) - c0
        stage.free(seq)
        print(json.dumps({"tokens": job["decode_tokens"], "wall_s": wall, "cpu_s": cpu}),
              flush=True)  # fmt: skip


class Engine:
    def __init__(self, job: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(job)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._line()

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            sys.exit("the engine worker failed")
        return json.loads(line)

    def run(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        r = self._line()
        n = r["tokens"]
        return {"tok_s": n / r["wall_s"], "cpu_ms_per_tok": 1e3 * r["cpu_s"] / n}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


# ---- the shim side ------------------------------------------------------------------------
def shim_run(client: Any, cluster: Cluster, request: Any) -> dict[str, Any]:
    """One greedy request; CPU of every shim and of this client over its decode."""
    pids = [p.pid for p in cluster.procs]
    start: dict[str, Any] = {}
    n = 0
    for chunk in client.generate(request):
        if not start:  # the first token is out: decoding starts
            start = {"t": time.perf_counter(), "me": time.process_time(),
                     "shims": [threads_s(p) for p in pids]}  # fmt: skip
            n0 = chunk.completion_tokens
        n = chunk.completion_tokens
    wall = time.perf_counter() - start["t"]
    tokens = n - n0
    ends = [threads_s(p) for p in pids]
    threads: dict[str, float] = {}
    for a, b in zip(start["shims"], ends, strict=True):
        for name, s in b.items():
            threads[name] = threads.get(name, 0.0) + 1e3 * (s - a.get(name, 0.0)) / tokens
    shim_ms = sum(threads.values())
    client_ms = 1e3 * (time.process_time() - start["me"]) / tokens
    return {"tok_s": tokens / wall, "cpu_ms_per_tok": shim_ms, "client_ms_per_tok": client_ms,
            "threads_ms_per_tok": threads}  # fmt: skip


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        if isinstance(rows[0][key], dict):
            names = sorted({n for r in rows for n in r[key]})
            out[key] = {n: round(statistics.median(r[key].get(n, 0.0) for r in rows), 2)
                        for n in names}  # fmt: skip
        else:
            out[key] = round(statistics.median(r[key] for r in rows), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="a pulled registry name")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shims", default="1,2", help="cluster sizes (comma-separated), each measured")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--no-engine", action="store_true", help="the shim side alone")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        engine_worker(json.loads(args.worker))
        return 0

    from llm_omninode.backend.registry import ModelRegistry
    from llm_omninode.backend.sampling import SamplingOptions
    from llm_omninode.client import ShimClient
    from llm_omninode.home import omni_home
    from llm_omninode.request import GenerationRequest

    registry = ModelRegistry(omni_home())
    try:
        source = registry.store.file_source(registry.get(args.model).model_id)
    except Exception as exc:  # noqa: BLE001 - the registry's own words
        source = None
        print(f"{args.model}: not pulled here ({exc}); skipped")
    if source is None:
        print(json.dumps({"model": args.model, "skipped": "not pulled here"}))
        return 0
    job = {"model": args.model, "threads": args.threads, "decode_tokens": args.decode_tokens}
    engine = None if args.no_engine else Engine(job)
    request = GenerationRequest(
        model="bench", prompt=PROMPT, max_tokens=args.decode_tokens + 1,
        options=SamplingOptions().updated(temperature=0.0, repeat_penalty=1.0),
    )  # fmt: skip
    sizes = [int(n) for n in args.shims.split(",")]
    rows: dict[str, list] = {"engine": [], **{f"shims_{n}": [] for n in sizes}}
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp, ExitStack() as stack:
        if engine is not None:
            stack.callback(engine.close)
        sides = []
        for n in sizes:  # each cluster loaded once, all kept while they are measured in turn
            cluster = Cluster(Path(tmp) / f"shims{n}", n, Path(source.path), alias="bench",
                              threads=max(1, args.threads // n))  # fmt: skip
            stack.callback(cluster.close)
            client = stack.enter_context(ShimClient.connect(start=False))
            cluster.wait_peers(client)
            sides.append((f"shims_{n}", client, cluster))
        for run in range(args.runs + 1):
            got = {name: shim_run(client, cluster, request) for name, client, cluster in sides}
            if engine is not None:
                got["engine"] = engine.run()
            if run:  # run 0 warms every side up
                for name, r in got.items():
                    rows[name].append(r)
            print(f"run {run}: " + "; ".join(
                f"{name} {r['tok_s']:.1f} tok/s {r['cpu_ms_per_tok']:.1f} CPU ms/tok"
                + (f" (client {r['client_ms_per_tok']:.1f})" if "client_ms_per_tok" in r else "")
                for name, r in got.items()), flush=True)  # fmt: skip
    result: dict[str, Any] = {"model": args.model, "threads": args.threads,
                              "runs": args.runs, "load_avg": os.getloadavg()[0]}  # fmt: skip
    for side, got_rows in rows.items():
        if got_rows:
            result[side] = median_of(got_rows)
    base = result.get("engine") or result.get(f"shims_{sizes[0]}")
    base_name = "engine" if "engine" in result else f"shims_{sizes[0]}"
    for n in sizes:
        r = result[f"shims_{n}"]
        r[f"vs_{base_name}"] = round(r["tok_s"] / base["tok_s"], 3)
        r[f"extra_cpu_ms_per_tok_vs_{base_name}"] = round(
            r["cpu_ms_per_tok"] - base["cpu_ms_per_tok"], 2
        )
    if len(sizes) > 1:
        first = result[f"shims_{sizes[0]}"]
        for n in sizes[1:]:
            r = result[f"shims_{n}"]
            r[f"vs_shims_{sizes[0]}"] = round(r["tok_s"] / first["tok_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
