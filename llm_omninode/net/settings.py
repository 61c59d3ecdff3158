"""Transport settings of a QUIC endpoint (net/quic.py, net/session.py): windows, datagram
size, liveness (pings, the silence after which a peer is lost), timeouts and the bounds on
what one peer may make us hold."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import tls
from .identity import NodeIdentity

LAN_DATAGRAM_SIZE = 1452  # fits a 1500-byte Ethernet MTU under IPv6 + UDP: no fragmentation
# loopback's MTU is 65536: a datagram under it less the IPv6 + UDP headers (65,488), once
# STREAM frames may be longer than aioquic's 16 KiB (net/wide_frames.py)
LOOPBACK_DATAGRAM_SIZE = 65000


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class QuicSettings:
    """Transport knobs. The windows and the datagram size are what bulk transfer speed hangs on
    (docs/performance.md)."""

    max_data: int = 128 * 1024 * 1024  # connection receive window
    max_stream_data: int = 65 * 1024 * 1024  # per-stream receive window: one shard window
    # UDP payload per datagram; None: LOOPBACK_DATAGRAM_SIZE towards/on a loopback address,
    # else LAN_DATAGRAM_SIZE. aioquic spends its time per packet, so size is speed.
    max_datagram_size: int | None = None
    idle_timeout: float = 60.0  # a connection with no packets for this long is dropped
    # both sides ping this often (the peer's event loop answers even while its stage
    # computes); a connection silent for lost_after (while our own loop ran) is dropped as
    # lost, long before the idle timeout. A killed peer on a live host is known at once (ICMP,
    # see session.py).
    keepalive: float | None = 1.0
    lost_after: float | None = 20.0
    connect_timeout: float = 10.0  # handshake + admission, client side
    join_timeout: float = 10.0  # server waits this long for JOIN after the handshake
    request_timeout: float = 60.0  # default for Connection.request / each frame of stream()
    max_buffered: int = 512 * 1024 * 1024  # inbound bytes held per connection before OVERLOAD
    # what one peer may make us hold: streams open at once (QUIC MAX_STREAMS; more wait on
    # the peer's side), and bytes queued per stream that it has not read yet (send() waits)
    max_streams: int = 128
    send_high_water: int = 4 * 1024 * 1024
    socket_buffer: int = 4 * 1024 * 1024  # SO_RCVBUF / SO_SNDBUF asked of the OS

    def datagram_size(self, host: str) -> int:
        if self.max_datagram_size is not None:
            return self.max_datagram_size
        return LOOPBACK_DATAGRAM_SIZE if _is_loopback(host) else LAN_DATAGRAM_SIZE

    def quic_configuration(self, identity: NodeIdentity, is_client: bool, host: str):
        return tls.configuration(
            is_client=is_client,
            certificate=identity.certificate,
            private_key=identity.private_key,
            max_data=self.max_data,
            max_stream_data=self.max_stream_data,
            max_datagram_size=self.datagram_size(host),
            idle_timeout=self.idle_timeout,
        )
