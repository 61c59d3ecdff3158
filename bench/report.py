"""``make bench``: run every benchmark here once and write a report, markdown and JSON.

Each script prints its figures and, last, one JSON line; this collects those lines, adds a
description of the machine (CPU, cores, memory, Python, NumPy, ggml-python, MLX) and writes
bench/results/report.md and report.json. The figures are medians inside one run of each
script, and ratios against a baseline measured in the same run, since this kind of machine is
shared and noisy. The last line printed is the JSON report.

    .venv/bin/python bench/report.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

# script, arguments (full), arguments (--quick)
BENCHES = [
    ("engine.py", ["--runs", "5"], ["--runs", "2", "--decode-tokens", "32"]),
    ("pipeline.py", ["--stages", "1,2,3", "--runs", "3"], ["--stages", "1,2", "--runs", "1"]),
    # short answers (prefill weighs as much as decode) and chat-length ones
    ("concurrency.py", ["--concurrent", "4", "--runs", "3"], ["--runs", "1"]),
    ("concurrency.py", ["--concurrent", "4", "--runs", "3", "--decode-tokens", "128"],
     ["--runs", "1", "--decode-tokens", "64"]),
    ("prefill.py", ["--runs", "3"], ["--runs", "1", "--repeat", "4"]),
    ("overhead.py", ["--runs", "5"], ["--runs", "2", "--decode-tokens", "24"]),
    ("transfer.py", ["--size-mib", "64", "--runs", "3", "--rtt-count", "1000"],
     ["--size-mib", "16", "--runs", "1", "--rtt-count", "200"]),
    ("constrained.py", ["--runs", "3"], ["--runs", "1", "--models", "smollm2"]),
]  # fmt: skip


def machine() -> dict:
    import numpy as np

    info: dict = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        import mlx.core as mx

        info["mlx"] = getattr(mx, "__version__", "?")
        info["mlx_device"] = str(mx.default_device())
    except ImportError:
        pass
    try:
        import ggml

        info["ggml_python"] = getattr(ggml, "__version__", "?")
    except ImportError:
        pass
    return info


def run(script: str, args: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / script), *args]
    print(f"== {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = round(time.perf_counter() - t0, 1)
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print("   ", line, flush=True)
    try:
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except ValueError:
        result = None
    if result is None:
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(f"   failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"script": script, "args": args, "ok": False, "exit": proc.returncode,
                "wall_s": wall}  # fmt: skip
    return {"script": script, "args": args, "ok": True, "wall_s": wall, "result": result}


def markdown(report: dict) -> str:
    m = report["machine"]
    out = ["# OmniNode benchmark report", "",
           f"Run {report['date']} on {m.get('cpu', '?')}, {m.get('cores')} cores, "
           f"{m.get('memory_gib', '?')} GiB; {m.get('platform')}; Python {m.get('python')}, "
           f"NumPy {m.get('numpy')}, ggml-python {m.get('ggml_python', '?')}, "
           f"MLX {m.get('mlx', '?')} ({m.get('mlx_device', '?')}).", "",
           "Medians inside one run of each script; ratios against a baseline of the same run.",
           ""]  # fmt: skip
    for bench in report["benches"]:
        out.append(f"## {bench['script']} {' '.join(bench['args'])} ({bench['wall_s']} s)")
        out.append("")
        if not bench["ok"]:
            out += [f"failed (exit {bench['exit']})", ""]
            continue
        out += ["```json", json.dumps(bench["result"], indent=1), "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (a smoke test)")
    args = ap.parse_args(argv)
    benches = [run(script, quick if args.quick else full) for script, full, quick in BENCHES]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "quick": args.quick,
        "benches": benches,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "report.md").write_text(markdown(report))
    print(f"wrote {RESULTS / 'report.md'} and report.json")
    print(json.dumps(report))
    return 0 if all(b["ok"] for b in benches) else 1


if __name__ == "__main__":
    raise SystemExit(main())
