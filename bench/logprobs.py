"""Logprobs: the decode cost of asking for them (top_logprobs=20) against not asking.

Starts ``--nodes`` real shims on loopback (bench/pipeline.py's Cluster; node 0 serves the HTTP
API, the last stage is wherever the plan puts it, so with 2 nodes the scores usually cross
QUIC), loads the model, then alternates requests to Ollama's /api/generate, greedy with
``--decode-tokens`` tokens, with ``logprobs: true, top_logprobs: 20`` and without, ``--runs``
times each. Decode speed is the shim's own ``eval_count / eval_duration`` (prefill left out).
Medians of the interleaved runs; also the reduction alone (backend/logprobs.py's score_rows,
one row of the model's vocabulary, top 20), timed in process. The last line is JSON.

    .venv/bin/python bench/logprobs.py [--nodes 2] [--runs 7] [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import Cluster, find_model

PROMPT = "Write a short story about a lighthouse keeper."


def generate(url: str, decode_tokens: int, top: int | None) -> tuple[float, int]:
    """(decode tokens per second, logprob entries returned) of one greedy request."""
    body = {"model": "smollm2", "prompt": PROMPT, "stream": False,
            "options": {"temperature": 0, "num_predict": decode_tokens}}  # fmt: skip
    if top is not None:
        body.update(logprobs=True, top_logprobs=top)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        conn.request("POST", "/api/generate", body=json.dumps(body).encode())
        doc = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    if "error" in doc:
        raise SystemExit(f"generate failed: {doc['error']}")
    return doc["eval_count"] / (doc["eval_duration"] / 1e9), len(doc.get("logprobs") or [])


def reduction_us(model: Path, k: int, repeats: int = 300) -> float:
    """Median microseconds of scoring one row of logits of the model's vocabulary."""
    import time

    import numpy as np

    from llm_omninode.backend.gguf import open_gguf
    from llm_omninode.backend.logprobs import score_rows
    from llm_omninode.backend.spec import ModelSpec

    f = open_gguf(model)
    vocab = ModelSpec.from_metadata(f.metadata, f.tensors).vocab_size
    f.close()
    row = np.random.default_rng(0).normal(0, 3, (1, vocab)).astype(np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score_rows(row, [0], k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the pulled SmolLM2)")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    model = find_model(args.model)
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        cluster = Cluster(Path(tmp), args.nodes, model, api=True)
        try:
            url = json.loads((cluster.dirs[0] / "shim.json").read_text())["api"]
            from llm_omninode.client import ShimClient

            with ShimClient.connect(start=False) as client:
                cluster.wait_peers(client)
            generate(url, 4, 20)  # plan, load, first graphs
            plain, scored = [], []
            for _ in range(args.runs):
                plain.append(generate(url, args.decode_tokens, None)[0])
                rate, entries = generate(url, args.decode_tokens, 20)
                scored.append(rate)
                print(f"no logprobs {plain[-1]:.1f} tok/s; top_logprobs=20 {rate:.1f} tok/s "
                      f"({entries} entries)", flush=True)  # fmt: skip
        finally:
            cluster.close()
    a, b = statistics.median(plain), statistics.median(scored)
    top0, top20 = reduction_us(model, 0), reduction_us(model, 20)
    print(f"score_rows, one row: {top0:.0f} us (its token only), {top20:.0f} us (top 20)")
    result = {
        "nodes": args.nodes,
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "plain_tok_s": round(a, 2),
        "top20_tok_s": round(b, 2),
        "overhead_ms_per_token": round(1000 / b - 1000 / a, 3),
        "ratio": round(b / a, 3),
        "reduction_us_top0": round(top0, 1),
        "reduction_us_top20": round(top20, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
