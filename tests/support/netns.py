"""A throwaway LAN of Linux network namespaces for multi-process tests (mDNS, QUIC).

Layout for ``Topology(n)``::

    <prefix>-<pid>-<token>-sw   the "switch": bridge br0 (multicast snooping and STP off, so
                                multicast such as mDNS 224.0.0.251:5353 floods to every port),
                                ports p0 .. p<n-1>
    <prefix>-<pid>-<token>-<i>  node i: lo up, eth0 = 198.1{8,9}.X.(i+2)/24, a multicast route
                                on eth0; eth0's veth peer is port p<i> of the switch

Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking), one random /24 per Topology. Every
link is created inside a namespace (the veth's peer end is created straight into the switch),
so nothing ever appears in the root namespace and no traffic can reach the host's interfaces.
``__exit__`` kills what ``popen`` started and deletes every namespace, even after a failure.
Needs root and iproute2; ``netns_available()`` says why not otherwise (for ``pytest.skip``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import sys
from types import TracebackType

IP_TIMEOUT = 10  # seconds for one `ip` command
BRIDGE = "br0"
NODE_IF = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=check
    )


@functools.cache
def netns_available() -> str | None:
    """None if this process can build a Topology, else the reason it cannot."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) not installed"
    probe = f"omniprobe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        for args in (
            ("link", "add", "b0", "type", "bridge"),
            ("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
        ):
            tried = _ip("-n", probe, *args, check=False)
            if tried.returncode != 0:
                return f"`ip {' '.join(args)}` failed in a namespace: {tried.stderr.strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run `ip`: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)


class Topology:
    """``n`` node namespaces on one bridged /24; a context manager."""

    def __init__(self, n: int, prefix: str = "omni") -> None:
        if not 1 <= n <= 200:
            raise ValueError("a Topology holds 1..200 nodes")
        token = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{token}-sw"
        self.names: list[str] = [f"{token}-{i}" for i in range(n)]
        # one random /24 inside 198.18.0.0/15, .1 left free (a gateway, should a test want one)
        net = f"198.{18 + secrets.randbelow(2)}.{secrets.randbelow(256)}"
        self.prefix_len = 24
        self.addresses: list[str] = [f"{net}.{i + 2}" for i in range(n)]
        self.interfaces: list[str] = [NODE_IF] * n
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        sw = self.switch
        self._add_netns(sw)
        _ip(
            "-n",
            sw,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        )
        _ip("-n", sw, "link", "set", BRIDGE, "up")
        for i, (name, addr) in enumerate(zip(self.names, self.addresses, strict=True)):
            port = f"p{i}"
            self._add_netns(name)
            # created inside the node namespace, its peer straight inside the switch namespace
            _ip(
                "-n",
                name,
                "link",
                "add",
                NODE_IF,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                sw,
            )
            _ip("-n", sw, "link", "set", port, "master", BRIDGE)
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", name, "addr", "add", f"{addr}/{self.prefix_len}", "dev", NODE_IF)
            _ip("-n", name, "link", "set", NODE_IF, "multicast", "on", "up")
            _ip("-n", name, "route", "add", "224.0.0.0/4", "dev", NODE_IF)

    def _exec(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *argv]

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside node ``i`` (environment inherited); killed at exit if alive."""
        proc = subprocess.Popen(self._exec(i, argv), **kwargs)  # `ip netns exec` execs argv
        self._procs.append(proc)
        return proc

    def run(self, i: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside node ``i`` to completion (subprocess.run's keywords apply)."""
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self._exec(i, argv), **kwargs)

    def close(self) -> None:
        """Kill what popen started, then delete every namespace. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        # deleting a namespace destroys its links, and a veth dies with either end
        for name in reversed(self._created):
            _ip("netns", "del", name, check=False)
        self._created.clear()
