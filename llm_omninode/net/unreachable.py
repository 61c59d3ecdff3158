"""ICMP errors on UDP sockets: the host of a peer whose process died answers our datagrams
with "port unreachable". Linux reports that on unconnected sockets too once asked
(IP_RECVERR), with the address each failed datagram went to in the socket's error queue;
elsewhere a dead peer is found by silence alone (net/session.py)."""

from __future__ import annotations

import socket
import sys
from typing import Any

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
PORT_UNREACHABLE = "its port is unreachable (the process is gone)"
MAX_ERRORS = 64  # errors taken from the queue per report


def report_unreachable(sock: socket.socket) -> bool:
    """Ask the OS to report ICMP errors of datagrams ``sock`` sent (Linux only); whether it
    will. Elsewhere a dead peer is found by silence alone."""
    if sys.platform != "linux":
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    except OSError:
        return False
    return True


def unreachable(sock: socket.socket) -> list[Any]:
    """Drain ``sock``'s error queue: the addresses datagrams could not be delivered to."""
    addrs = []
    for _ in range(MAX_ERRORS):
        try:
            _, _, _, addr = sock.recvmsg(1, 512, MSG_ERRQUEUE)
        except OSError:  # empty (EAGAIN), or no error queue here
            break
        if addr:
            addrs.append(addr)
    return addrs


def same_addr(a: Any, b: Any) -> bool:
    return bool(a) and bool(b) and tuple(a[:2]) == tuple(b[:2])
