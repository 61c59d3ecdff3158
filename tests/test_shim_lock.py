"""One shim per data directory, and start-up failures that say what is wrong (real processes).

A shim holds an exclusive ``flock`` on ``<data dir>/shim.lock`` (with its pid in it) for its
whole life; a second one on the same directory exits at once, naming the first; the kernel
drops the lock of a process killed with -9, so the next start takes the directory over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.shim_cluster import LLM, SHIM

from llm_omninode.client import local_shim, start_local_shim
from llm_omninode.home import SHIM_LOCK_FILE, SHIM_STATE_FILE, data_dir_locked, data_dir_owner

pytestmark = [
    pytest.mark.cluster,
    # no flock on Windows: the lock is not taken there
    pytest.mark.skipif(sys.platform == "win32", reason="data dir lock uses flock"),
]

FLAGS = ["--host", "127.0.0.1", "--port", "0", "--no-mdns", "--no-api", "--max-memory", "1GiB"]


def shim_argv(data: Path, *extra: str) -> list[str]:
    return [*SHIM, "--data-dir", str(data), *FLAGS, *extra]


def env_for(data: Path, root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMNI_HOME=str(data), LLM_USER_PATH=str(root / "llm"), PYTHONUNBUFFERED="1")
    env.pop("OMNI_SHIM", None)
    return env


class Shims:
    """Background shims of one test, killed at its end whatever happened."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def start(self, data: Path, *extra: str, timeout: float = 60.0) -> subprocess.Popen:
        log = open(self.root / f"shim{len(self.procs)}.log", "ab")  # noqa: SIM115 - the child's
        proc = subprocess.Popen(
            shim_argv(data, *extra), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env=env_for(data, self.root),
        )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = local_shim(data)
            if found is not None and found[2] == proc.pid:
                return proc
            assert proc.poll() is None, Path(log.name).read_text()
            time.sleep(0.1)
        raise AssertionError(f"the shim did not start: {Path(log.name).read_text()}")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def shims(tmp_path):
    s = Shims(tmp_path)
    yield s
    s.close()


def run_shim(data: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(shim_argv(data, *extra), capture_output=True, text=True, timeout=120,
                          env=env_for(data, root))  # fmt: skip


def test_second_shim_on_a_data_dir_exits_naming_the_first_and_kill_9_frees_it(shims, tmp_path):
    data = tmp_path / "node"
    first = shims.start(data)
    assert (data / SHIM_LOCK_FILE).read_text().strip() == str(first.pid)
    assert data_dir_locked(data) is True and data_dir_owner(data) == first.pid
    state = (data / SHIM_STATE_FILE).read_text()
    files = sorted(p.relative_to(data) for p in data.rglob("*"))

    second = run_shim(data, tmp_path)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert lines == [
        f"omni-shim: data dir {data} is in use by omni-shim pid {first.pid} "
        "(stop it with `llm omni stop` or pick another --data-dir)"
    ], second.stderr
    assert second.stdout == ""  # it did not even make a cluster secret
    # nothing of the first one's was touched, and it still serves
    assert (data / SHIM_STATE_FILE).read_text() == state
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == files
    assert local_shim(data)[2] == first.pid

    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert (data / SHIM_STATE_FILE).exists()  # left behind by the dead one ...
    assert data_dir_locked(data) is False  # ... but its lock went with it
    assert local_shim(data) is None
    third = shims.start(data)  # takes the directory over
    assert (data / SHIM_LOCK_FILE).read_text().strip() == str(third.pid)
    assert local_shim(data)[2] == third.pid


def test_stale_state_of_a_live_pid_is_not_a_shim(tmp_path):
    """shim.json naming a live process that holds no lock (a pid reused since a kill -9) is
    not taken for a shim: no client connects there, `llm omni stop` kills nothing."""
    data = tmp_path / "node"
    data.mkdir()
    state = {"pid": os.getpid(), "node_id": "x", "host": "127.0.0.1", "port": 9, "started": 0}
    (data / SHIM_STATE_FILE).write_text(json.dumps(state))
    (data / SHIM_LOCK_FILE).write_text(f"{os.getpid()}\n")  # as a shim leaves it when killed
    assert data_dir_locked(data) is False
    assert local_shim(data) is None and data_dir_owner(data) is None
    result = subprocess.run([*LLM, "omni", "stop"], capture_output=True, text=True,
                            timeout=60, env=env_for(data, tmp_path))  # fmt: skip
    assert result.returncode != 0 and "no shim is running here" in result.stderr


def test_auto_start_finds_the_shim_that_owns_the_dir(shims, tmp_path, monkeypatch, capsys):
    """The plugin's auto-start, racing a shim that already holds the directory, uses that
    one instead of failing; `llm omni stop` stops it and waits for its lock to go."""
    data = tmp_path / "node"
    first = shims.start(data)
    monkeypatch.setenv("OMNI_SHIM_ARGS", " ".join(FLAGS))
    host, port = start_local_shim(data, timeout=60)
    assert (host, port) == local_shim(data)[:2] and local_shim(data)[2] == first.pid
    err = capsys.readouterr().err
    assert f"in use by omni-shim pid {first.pid}" in err and "using it" in err, err
    result = subprocess.run([*LLM, "omni", "stop"], capture_output=True, text=True,
                            timeout=60, env=env_for(data, tmp_path))  # fmt: skip
    assert result.returncode == 0 and f"pid {first.pid}" in result.stdout, result.stderr
    assert first.wait(10) == 0
    assert data_dir_locked(data) is False and not (data / SHIM_STATE_FILE).exists()


def test_a_taken_udp_port_is_a_clear_one_line_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_shim(tmp_path / "node", tmp_path, "--port", str(port))
    assert result.returncode == 1
    expected = f"omni-shim: UDP port {port} on 127.0.0.1 is in use (another omni-shim? pick --port)"
    assert result.stderr.strip().splitlines()[-1] == expected, result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr
    assert result.stdout == ""  # said before a new data dir got its key and cluster secret
    assert not (tmp_path / "node" / "node_key.pem").exists()


def test_a_taken_api_port_is_a_clear_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*SHIM, "--data-dir", str(tmp_path / "node"),
                *[a for a in FLAGS if a != "--no-api"], "--api-port", str(port)]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                env=env_for(tmp_path / "node", tmp_path))  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("omni-shim: HTTP API: ") and "already in use" in last, result.stderr
    assert "--api-port" in last and "Traceback" not in result.stderr


def test_a_bind_lost_in_a_race_is_named_too():
    """The port was free at the early check and taken when the node bound it: the same
    message (shim/main.py maps the node's start failure), the API's own errors untouched."""
    import asyncio
    import errno
    from types import SimpleNamespace

    from omninode_shim.http.server import ApiStartError
    from omninode_shim.main import UdpBindError, _run

    def node_failing_with(exc):
        class FailingNode:
            def __init__(self, config) -> None:
                self.server = self.api = None

            async def start(self) -> None:
                raise exc

            async def stop(self) -> None:
                pass

        return FailingNode

    config = SimpleNamespace(host="127.0.0.1", port=7341)
    taken = OSError(errno.EADDRINUSE, "Address already in use")
    with pytest.raises(UdpBindError, match=r"^UDP port 7341 on 127.0.0.1 is in use \(another"):
        asyncio.run(_run(node_failing_with(taken), config))
    api = ApiStartError("HTTP API: 127.0.0.1:11434 is already in use")
    with pytest.raises(ApiStartError):
        asyncio.run(_run(node_failing_with(api), config))
