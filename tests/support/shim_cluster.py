"""Real ``omni-shim`` processes for end-to-end tests: on loopback, or one per network namespace.

Each node gets its own data directory; node 0 creates the cluster secret and the others join
with it. Clients (``llm`` itself, in a subprocess) use node 0's data directory, so they hold
the secret too. Every process is killed when the cluster closes, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from llm_omninode.client import local_shim
from llm_omninode.home import SHIM_STATE_FILE
from llm_omninode.net.admission import create_cluster_secret
from llm_omninode.net.identity import load_or_create_identity

SHIM = [sys.executable, "-m", "omninode_shim"]
LLM = [sys.executable, "-m", "llm"]


def leftovers(status: dict) -> dict[str, int]:
    """What a node's status says is still running: generations (running or queued),
    sequences passing through its stages, live KV caches (those of finished sequences kept for
    a next turn, at most 4 a stage, are not live) and samplers."""
    hosted = status["hosted"]
    return {
        "generations": status["generations"],
        "pipelines": status["pipelines"],
        "kv_caches": sum(h["sequences"] - h["parked"] for h in hosted),
        "pickers": sum(h["pickers"] for h in hosted),
    }


class ShimCluster:
    def __init__(
        self,
        root: Path,
        n: int,
        topology=None,
        max_memory: str = "2GiB",
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        self.n = n
        self.topology = topology  # tests/support/netns.Topology, or None for loopback
        self.max_memory = max_memory
        self.dirs = [root / f"node{i}" for i in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.logs = [root / f"node{i}.log" for i in range(n)]
        self.ports: list[int] = [0] * n
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.secret = create_cluster_secret(self.dirs[0])
        self.node_ids = [load_or_create_identity(d).node_id for d in self.dirs]

    def host(self, i: int) -> str:
        return self.topology.addresses[i] if self.topology else "127.0.0.1"

    def env(self, i: int = 0, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            OMNI_HOME=str(self.dirs[i]),
            LLM_USER_PATH=str(self.root / f"llm{i}"),
            OMNI_SHIM=f"{self.host(i)}:{self.ports[i]}",
            PYTHONUNBUFFERED="1",
        )
        # the test's shims share this machine's cores with each other and with pytest: their
        # ggml threads sleep at barriers instead of spinning (libgomp's default ~3 ms)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.update(self.extra_env)
        env.update(extra)
        return env

    def _argv(self, i: int, peers: Sequence[str]) -> list[str]:
        argv = [*SHIM, "--data-dir", str(self.dirs[i]), "--name", f"node{i}",
                "--max-memory", self.max_memory, "--log-level", "info",
                "--api-port", "0", *self.extra_args]  # fmt: skip
        if "--threads" not in self.extra_args:  # shims sharing cores must not wait on each other
            argv += ["--threads", str(max(1, (os.cpu_count() or 1) // self.n))]
        if i:
            argv += ["--join", self.secret]
        if self.topology is not None:  # mDNS across the namespaces' bridge, fixed port
            addr = self.topology.addresses[i]
            argv += ["--host", addr, "--port", "7341", "--mdns-interface", addr]
        else:
            argv += ["--host", "127.0.0.1", "--port", "0", "--no-mdns"]
            for p in peers:
                argv += ["--peer", p]
        return argv

    def start(self, i: int, timeout: float = 60.0, args: Sequence[str] = ()) -> None:
        """Start node ``i`` (``args``: more flags for it alone) and wait until it serves."""
        peers = [f"127.0.0.1:{self.ports[j]}" for j in range(self.n) if j != i and self.ports[j]]
        argv = [*self._argv(i, peers), *args]
        log = open(self.logs[i], "ab")  # noqa: SIM115 - the process owns it
        kwargs = dict(stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env(i))
        if self.topology is not None:
            self.procs[i] = self.topology.popen(i, argv, **kwargs)
        else:
            self.procs[i] = subprocess.Popen(argv, **kwargs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise RuntimeError(f"node{i} exited:\n{self.log(i)}")
            found = local_shim(self.dirs[i])
            if found is not None:
                self.ports[i] = found[1]
                return
            time.sleep(0.1)
        raise RuntimeError(f"node{i} did not start within {timeout} s:\n{self.log(i)}")

    def api_url(self, i: int) -> str:
        """Node ``i``'s HTTP API (Ollama, OpenAI), as its shim.json says (loopback mode)."""
        state = json.loads((self.dirs[i] / SHIM_STATE_FILE).read_text())
        return state["api"]

    def start_all(self) -> None:
        for i in range(self.n):
            self.start(i)

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")[-6000:]

    def run(self, argv: Sequence[str], i: int = 0, timeout: float = 300.0, **env: str):
        """Run a command as a client of node ``i`` (in its namespace if there are any)."""
        kwargs = dict(capture_output=True, text=True, timeout=timeout, env=self.env(i, **env))
        if self.topology is not None:
            return self.topology.run(i, list(argv), **kwargs)
        return subprocess.run(list(argv), **kwargs)

    def llm(self, *args: str, i: int = 0, timeout: float = 300.0) -> str:
        result = self.run([*LLM, *args], i=i, timeout=timeout)
        if result.returncode != 0:
            logs = "\n".join(f"--- node{j}\n{self.log(j)}" for j in range(self.n))
            raise AssertionError(f"llm {args} failed:\n{result.stdout}\n{result.stderr}\n{logs}")
        return result.stdout

    def leftovers(self, i: int) -> dict[str, int]:
        """What node ``i`` still runs (``leftovers`` of its status), asked over QUIC as the
        identity of this process's OMNI_HOME (which must be a member)."""
        from llm_omninode.client import ShimClient

        with ShimClient("127.0.0.1", self.ports[i]) as client:
            return leftovers(client.request("status"))

    def wait_for_peers(self, count: int, i: int = 0, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = json.loads(self.llm("omni", "peers", "--json", i=i))
            live = [r for r in rows if r.get("live") and r.get("memory_budget")]
            if len(live) >= count:
                return rows
            time.sleep(1.0)
        raise AssertionError(f"expected {count} nodes, saw {rows}")

    def stop(self, i: int, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def close(self) -> None:
        for i in range(self.n):
            with contextlib.suppress(Exception):  # cleanup must go on for the others
                self.stop(i)

    def __enter__(self) -> ShimCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
