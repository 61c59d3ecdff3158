"""Fault injection: random faults across 3 real shims while generations run.

Node 0 holds the model and coordinates every generation (it is never harmed: a generation
whose coordinator dies cannot finish, tests/test_failover.py covers that). Meanwhile a
seeded injector kills node 1 or 2 with SIGKILL (and starts it again), freezes one with
SIGSTOP for a moment (then SIGCONT), or drops a streaming client. Every generation must end
with the text it has with no fault, within a bound; afterwards nothing is left on any node
and no log holds a traceback or an unretrieved exception.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import ollama
import pytest
from support.shim_cluster import ShimCluster

from llm_omninode.backend.registry import ModelRegistry

pytestmark = [pytest.mark.model, pytest.mark.faults, pytest.mark.cluster]

PROMPTS = [
    "Name three rivers in Europe.",
    "Write a haiku about a lighthouse.",
    "What is the capital of France? Answer in one sentence.",
    "Give two tips for learning to cook.",
]
TOKENS = 24
GENERATIONS = 32  # at least 30
FAULTS = 20  # at least 20
SEED = 20261206
BOUND_S = 900  # the whole run, faults and all


def _drop_a_client(url: str, rng: random.Random) -> None:
    parts = urlsplit(url)
    body = json.dumps({"model": "smollm2", "prompt": rng.choice(PROMPTS), "stream": True,
                       "options": {"temperature": 0, "num_predict": 200}}).encode()  # fmt: skip
    head = (f"POST /api/generate HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(head + body)
        if rng.random() < 0.5:
            sock.recv(2048)  # mid-stream rather than before the first byte


def test_random_faults_during_generations(tmp_path: Path, smollm2_path: Path, monkeypatch):
    rng = random.Random(SEED)
    with ShimCluster(tmp_path, 3) as cluster:
        ModelRegistry(cluster.dirs[0]).add_file(smollm2_path, alias="smollm2")
        cluster.start_all()
        cluster.wait_for_peers(3)
        monkeypatch.setenv("OMNI_HOME", str(cluster.dirs[0]))
        url = cluster.api_url(0)
        client = ollama.Client(host=url, timeout=300)
        options = {"temperature": 0, "num_predict": TOKENS}
        want = {p: client.generate(model="smollm2", prompt=p, options=options).response
                for p in PROMPTS}  # fmt: skip
        deadline = time.monotonic() + BOUND_S
        results: list[tuple[str, str | BaseException]] = []
        lock = threading.Lock()
        done = threading.Event()

        def generate(worker: int) -> None:
            local = random.Random(SEED + worker)
            while not done.is_set():
                with lock:
                    if len(results) >= GENERATIONS:
                        return
                    results.append(("", "running"))
                    slot = len(results) - 1
                prompt = local.choice(PROMPTS)
                try:
                    text = client.generate(model="smollm2", prompt=prompt, options=options)
                    outcome: str | BaseException = text.response
                except Exception as exc:  # noqa: BLE001 - reported below
                    outcome = exc
                with lock:
                    results[slot] = (prompt, outcome)

        workers = [threading.Thread(target=generate, args=(w,)) for w in range(2)]
        for w in workers:
            w.start()
        faults: list[str] = []
        stopped: dict[int, bool] = {}
        try:
            while len(faults) < FAULTS and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.5, 2.5))
                kind = rng.choice(["kill", "stop", "drop", "drop"])
                victim = rng.choice([1, 2])
                proc = cluster.procs[victim]
                if kind == "drop":
                    _drop_a_client(url, rng)
                elif kind == "stop" and proc is not None and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGSTOP)
                    stopped[victim] = True
                    time.sleep(rng.uniform(0.3, 2.0))
                    os.kill(proc.pid, signal.SIGCONT)
                    stopped[victim] = False
                elif kind == "kill" and proc is not None and proc.poll() is None:
                    cluster.stop(victim, signal.SIGKILL)
                    time.sleep(rng.uniform(0.5, 2.0))
                    cluster.start(victim)
                else:
                    continue
                faults.append(f"{kind} node{victim}")
        finally:
            for i, frozen in stopped.items():
                proc = cluster.procs[i]
                if frozen and proc is not None and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
        for w in workers:
            w.join(max(1.0, deadline - time.monotonic()))
        done.set()
        assert not any(w.is_alive() for w in workers), "generations did not end in time"
        print(f"{len(faults)} faults: {', '.join(faults)}")
        assert len(faults) >= FAULTS
        finished = [(p, r) for p, r in results if r != "running"]
        assert len(finished) >= 30
        wrong = [(p, r) for p, r in finished if r != want[p]]
        assert not wrong, f"{len(wrong)} of {len(finished)} generations went wrong: {wrong[:3]}"

        # afterwards: every node live again, nothing left anywhere, clean logs
        for i in range(3):
            if cluster.procs[i] is None or cluster.procs[i].poll() is not None:
                cluster.start(i)
        cluster.wait_for_peers(3)
        for i in range(3):
            for _ in range(100):
                left = cluster.leftovers(i)
                if not any(left.values()):
                    break
                time.sleep(0.1)
            assert not any(left.values()), f"node{i} keeps {left}"
            log = cluster.log(i)
            assert "exception was never retrieved" not in log
            assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]
