"""Logprobs: the decode cost of asking for them (top_logprobs=20) against not asking.

Starts ``--nodes`` real shims on loopback (bench/pipeline.py's Cluster; node 0 serves the HTTP
API, the last stage is wherever the plan puts it, so with 2 nodes the scores usually cross
QUIC), loads the model, then alternates requests to Ollama's /api/generate, greedy with
``--decode-tokens`` tokens, with ``logprobs: true, top_logprobs: 20`` and without, ``--runs``
times each. Decode speed is the shim's own ``eval_count / eval_duration`` (prefill left out).
Medians of the interleaved runs; the last line is JSON.

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
    result = {
        "nodes": args.nodes,
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "plain_tok_s": round(a, 2),
        "top20_tok_s": round(b, 2),
        "overhead_ms_per_token": round(1000 / b - 1000 / a, 3),
        "ratio": round(b / a, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
