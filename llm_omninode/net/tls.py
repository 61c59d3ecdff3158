"""The few aioquic internals OmniNode relies on, in one place, checked loudly.

aioquic has no public switch for three things mutual authentication needs:

1. making the server send a TLS CertificateRequest: ``tls.Context._request_client_certificate``
   (set right after ``QuicConnection._initialize`` creates the context);
2. reading the peer's certificate after the handshake: ``tls.Context._peer_certificate``
   (aioquic checks the CertificateVerify signature with it, i.e. that the peer holds the key;
   it never checks the certificate chain on the server side, which suits self-signed ids);
3. a value bound to this TLS session for the admission proofs (an exporter): derived from the
   TLS master secret and the full handshake transcript through the client Finished
   (``tls.Context.key_schedule.derive_secret``), the same on both ends and different on every
   connection.

Two more for bounding what one peer can make us hold (not for authentication):

4. how many bidirectional streams the peer may open at once (QUIC ``MAX_STREAMS``), fixed at
   128 by aioquic: ``QuicConnection._local_max_streams_bidi``;
5. how many bytes of a stream are queued and not yet acknowledged by the peer (aioquic queues
   whatever it is given, whatever the peer's flow control allows):
   ``QuicStream.sender._buffer``.

And two for speed:

6. acknowledging with the data we send: aioquic delays every ACK by 1 ms
   (``QuicPacketSpace.ack_at``) and only then sends it, in a packet of its own even when a
   packet of data left in between; ``ack_with_data`` makes a packet of data carry the ACK
   that is due, as QUIC allows (one datagram and one wake-up of the peer fewer per frame);
7. STREAM frames of more than 16 KiB (``QuicConnection._write_stream_frame``, replaced per
   connection in net/wide_frames.py) so that a loopback datagram can be ~64 KB.

``check_internals()`` fails with a clear message if any of them moved; ``tests/test_quic.py``
calls it and runs a real handshake, so an aioquic upgrade outside the pinned range that broke
them fails loudly there instead of silently admitting unauthenticated peers.
"""

from __future__ import annotations

import functools
import ssl

import aioquic
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509

ALPN = "omni/1"
# [low, high): the pin asked for in pyproject.toml (aioquic>=1.4,<1.8). Below 1.4 the C packet
# crypto caps datagrams at 1500 bytes, which the loopback datagram size needs more than.
TESTED_AIOQUIC = ((1, 4), (1, 8))
BINDING_LABEL = b"omni/1 binding"


class TlsInternalsError(RuntimeError):
    """aioquic changed underneath us: refuse to run rather than run unauthenticated."""


def aioquic_version() -> tuple[int, ...]:
    return tuple(int(part) for part in aioquic.__version__.split(".")[:2] if part.isdigit())


def check_internals() -> None:
    version = aioquic_version()
    low, high = TESTED_AIOQUIC
    if not low <= version < high:
        raise TlsInternalsError(
            f"aioquic {aioquic.__version__} is outside the tested range {low}..<{high}: "
            "re-check net/tls.py against it"
        )
    missing = _missing_internals()
    if missing:
        raise TlsInternalsError(f"aioquic {aioquic.__version__} lacks {', '.join(missing)}")


@functools.cache
def _missing_internals() -> tuple[str, ...]:
    """The internals this module uses that the installed aioquic lacks (probed once)."""
    context = tls.Context(is_client=False)
    missing = [
        name
        for name in ("_request_client_certificate", "_peer_certificate", "key_schedule")
        if not hasattr(context, name)
    ]
    if not hasattr(QuicConnection, "_initialize"):
        missing.append("QuicConnection._initialize")
    probe = QuicConnection(configuration=QuicConfiguration(is_client=True))
    if not hasattr(probe, "_local_max_streams_bidi") or not hasattr(probe, "_streams"):
        missing.append("QuicConnection._local_max_streams_bidi/_streams")
    sender = QuicStreamSender(0, True)
    if not hasattr(sender, "_buffer") or not hasattr(sender, "_reset_error_code"):
        missing.append("QuicStreamSender._buffer/_reset_error_code")
    if not hasattr(tls.KeySchedule, "derive_secret"):
        missing.append("KeySchedule.derive_secret")
    if not hasattr(probe, "_spaces") or not hasattr(probe, "_write_stream_frame"):
        missing.append("QuicConnection._spaces/_write_stream_frame")
    return tuple(missing)


def configuration(
    *,
    is_client: bool,
    certificate: x509.Certificate,
    private_key: object,
    max_data: int,
    max_stream_data: int,
    max_datagram_size: int,
    idle_timeout: float,
) -> QuicConfiguration:
    """TLS 1.3 (QUIC's only TLS), ALPN omni/1, our certificate, no tickets and no 0-RTT."""
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_data=max_data,
        max_stream_data=max_stream_data,
        max_datagram_size=max_datagram_size,
        idle_timeout=idle_timeout,
        # peers are checked by node id (net/quic.py), never by a CA
        verify_mode=ssl.CERT_NONE,
        server_name="omni",  # SNI is not used for anything
        congestion_control_algorithm="cubic",
    )
    config.certificate = certificate
    config.private_key = private_key
    config.session_ticket = None
    return config


def require_client_certificate(connection: QuicConnection) -> None:
    """Make a server connection send a CertificateRequest in its handshake."""
    initialize = connection._initialize

    def _initialize(peer_cid: bytes) -> None:
        initialize(peer_cid)
        connection.tls._request_client_certificate = True

    connection._initialize = _initialize  # type: ignore[method-assign]


def peer_certificate(connection: QuicConnection) -> x509.Certificate | None:
    """The certificate whose key signed the peer's CertificateVerify, once handshaken."""
    return getattr(connection.tls, "_peer_certificate", None)


def session_binding(connection: QuicConnection) -> bytes:
    """A secret value unique to this TLS session, equal on both ends after the handshake."""
    key_schedule = connection.tls.key_schedule
    if key_schedule is None or key_schedule.generation != 3:
        raise TlsInternalsError("TLS key schedule not at the master secret after the handshake")
    return key_schedule.derive_secret(BINDING_LABEL)


def session_resumed(connection: QuicConnection) -> bool:
    return bool(connection.tls.session_resumed)


def limit_peer_streams(connection: QuicConnection, count: int) -> None:
    """Let the peer have at most ``count`` bidirectional streams open at once (announced in
    the transport parameters, so call before the handshake; aioquic grants one more each time
    one closes). A peer that opens more is closed with STREAM_LIMIT_ERROR by aioquic."""
    limit = connection._local_max_streams_bidi
    limit.value = limit.sent = count


def stream_backlog(connection: QuicConnection, stream_id: int) -> int | None:
    """Bytes queued on our side of a stream that the peer has not acknowledged yet; None once
    the stream is gone or reset (its queue will never drain by the peer reading it)."""
    stream = connection._streams.get(stream_id)
    if stream is None or stream.sender._reset_error_code is not None:
        return None
    return len(stream.sender._buffer)


def ack_with_data(connection: QuicConnection) -> None:
    """Let the next packet (of the data just queued) carry the ACK aioquic holds back for
    1 ms, instead of a packet of its own once that ms has passed."""
    space = connection._spaces.get(tls.Epoch.ONE_RTT)
    if space is not None and space.ack_at is not None:
        space.ack_at = 0.0  # due: written into the packet being built
