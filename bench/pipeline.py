"""Pipeline throughput: SmolLM2 split over 1, 2 and 3 shim processes on this machine.

For each cluster size it starts that many real ``omni-shim`` processes on loopback (node 0
holds the model, the others fetch their slices; each gets its share of the cores with
``--threads``, as if they were that many smaller devices), warms the plan up with one request, then
times ``--runs`` greedy requests (the shims keep no caches between requests: every run computes
its whole prompt). Prefill and decode times are the coordinator's own
(STREAM_END's prefill_s / decode_s), so client start-up is not counted. The cost of a hop
is the extra decode time per token over the single-stage run, divided by the network hops a
token makes around the ring (N stages, the coordinator holding the first: N-1 forward, one
back from the last). Each stage has fewer cores than the single stage here, so this is an
upper bound. The last line is JSON.

    .venv/bin/python bench/pipeline.py [--stages 1,2,3] [--runs 3] [--decode-tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOG_LEVEL = os.environ.get("OMNI_BENCH_LOG", "warning")  # the shims' logs, in the temp dir
PROMPT = (
    "Write a detailed, friendly explanation of how a bicycle works: the frame, the wheels, the "
    "chain and gears, the brakes, and how the rider balances. Then give three tips for riding "
    "safely in a city, and finish with a short summary of why cycling is good for health and "
    "for the environment. Use plain words that a child could follow."
)


def find_model(path: str | None) -> Path:
    if path:
        return Path(path)
    from llm_omninode.home import omni_home

    found = omni_home() / "files" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not found.is_file():
        sys.exit("SmolLM2 not found: run `make model` (llm omni pull smollm2) or pass --model")
    return found


class Cluster:
    def __init__(
        self, root: Path, n: int, model: Path, env: dict[str, str] | None = None, api: bool = False,
        alias: str = "smollm2", threads: int | None = None,
    ) -> None:  # fmt: skip
        from llm_omninode.backend.registry import ModelRegistry
        from llm_omninode.net.admission import create_cluster_secret

        self.root, self.n = root, n
        self.dirs = [root / f"node{i}" for i in range(n)]
        for d in self.dirs:
            d.mkdir(parents=True)
        secret = create_cluster_secret(self.dirs[0])
        ModelRegistry(self.dirs[0]).add_file(model, alias=alias)
        threads = threads or max(1, (os.cpu_count() or 1) // n)
        self.procs: list[subprocess.Popen] = []
        ports: list[int] = []
        for i, d in enumerate(self.dirs):
            argv = [sys.executable, "-m", "omninode_shim", "--data-dir", str(d), "--host",
                    "127.0.0.1", "--port", "0", "--no-mdns", "--no-api", "--no-prefix-cache",
                    "--name", f"node{i}", "--threads", str(threads),
                    "--max-memory", "2GiB", "--log-level", LOG_LEVEL]  # fmt: skip
            if api:  # node 0's HTTP API on a free port (shim.json says which)
                argv[argv.index("--no-api")] = "--api-port=0" if i == 0 else "--no-api"
            if i:
                argv += ["--join", secret]
            for p in ports:
                argv += ["--peer", f"127.0.0.1:{p}"]
            log = open(root / f"node{i}.log", "wb")  # noqa: SIM115 - the process owns it
            proc_env = {**os.environ, **(env or {})}
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, env=proc_env))
            ports.append(self._port(d, self.procs[-1]))
        os.environ["OMNI_HOME"] = str(self.dirs[0])
        os.environ["OMNI_SHIM"] = f"127.0.0.1:{ports[0]}"

    @staticmethod
    def _port(d: Path, proc: subprocess.Popen) -> int:
        from llm_omninode.client import local_shim

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"a shim exited; see {d.parent}")
            found = local_shim(d)
            if found is not None:
                return found[1]
            time.sleep(0.1)
        sys.exit("a shim did not start")

    def wait_peers(self, client) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = client.request("peers")["peers"]
            if sum(1 for r in rows if r.get("memory_budget") and r.get("live", True)) >= self.n:
                return
            time.sleep(0.5)
        sys.exit(f"the {self.n} shims did not all see each other")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@contextlib.contextmanager
def running(
    n: int, model: Path, env: dict[str, str] | None = None, threads: int | None = None
) -> Iterator:
    """A client of node 0 of ``n`` shims started in a temporary directory, once they all see
    each other; the shims stop on exit."""
    from llm_omninode.client import ShimClient

    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        cluster = Cluster(Path(tmp), n, model, env, threads=threads)
        try:
            with ShimClient.connect(start=False) as client:
                cluster.wait_peers(client)
                yield client
        finally:
            cluster.close()


def measure(n: int, model: Path, runs: int, decode_tokens: int, threads: int | None = None) -> dict:
    from llm_omninode.backend.sampling import SamplingOptions
    from llm_omninode.request import GenerationRequest

    request = GenerationRequest(
        model="smollm2",
        prompt=PROMPT,
        options=SamplingOptions().updated(temperature=0.0, repeat_penalty=1.0),
        max_tokens=decode_tokens,
    )
    with running(n, model, threads=threads) as client:
        t0 = time.perf_counter()
        list(client.generate(request))  # plan, load (and fetch) every stage
        warm_s = time.perf_counter() - t0
        stages = client.request("status")["plans"][0]["stages"]
        prefill, decode = [], []
        for _ in range(runs):
            last = list(client.generate(request))[-1]
            t = last.timings or {}
            prefill.append(last.prompt_tokens / t["prefill_s"])
            decode.append((last.completion_tokens - 1) / t["decode_s"])
    return {
        "stages": n,
        "split": [[s["start"], s["end"]] for s in stages],
        "first_request_s": round(warm_s, 2),
        "prompt_tokens": last.prompt_tokens,
        "decode_tokens": last.completion_tokens,
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "decode_tok_s": round(statistics.median(decode), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the pulled SmolLM2)")
    ap.add_argument("--stages", default="1,2,3", help="cluster sizes to measure")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    # default: the cores shared out (cores / shims each); --threads 1 compares stages as
    # 1-core devices, one stage included (on one machine a pipeline uses one core at a time)
    ap.add_argument("--threads", type=int, help="threads of every shim")
    args = ap.parse_args(argv)
    model = find_model(args.model)
    results = []
    for n in (int(s) for s in args.stages.split(",")):
        r = measure(n, model, args.runs, args.decode_tokens, args.threads)
        results.append(r)
        print(f"{n} stage(s) {r['split']}: prefill {r['prefill_tok_s']} tok/s "
              f"({r['prompt_tokens']} tokens), decode {r['decode_tok_s']} tok/s, "
              f"first request {r['first_request_s']} s", flush=True)  # fmt: skip
    base = next((r for r in results if r["stages"] == 1), None)
    summary: dict = {"results": results}
    if base is not None:
        for r in results:
            r["decode_vs_1"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
            r["prefill_vs_1"] = round(r["prefill_tok_s"] / base["prefill_tok_s"], 3)
            if r["stages"] > 1:  # hops around the ring: N - 1 forward, one back
                extra = 1 / r["decode_tok_s"] - 1 / base["decode_tok_s"]
                r["hop_ms_per_token"] = round(1000 * extra / r["stages"], 3)
        print("decode vs 1 stage:", {r["stages"]: r["decode_vs_1"] for r in results})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
