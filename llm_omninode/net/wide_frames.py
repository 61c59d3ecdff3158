"""STREAM frames longer than 16 KiB for aioquic, so loopback datagrams can be ~64 KB.

aioquic writes every STREAM frame's length as a 2-byte varint, which caps a frame, and so a
packet carrying one stream, at 16,383 bytes of data. QUIC allows any varint length; aioquic
reads them all. aioquic spends its time per packet (building, encrypting, acknowledging,
one ``sendto`` each), so on loopback, where a datagram may be 64 KB, four times fewer packets
is most of the transfer's speed. ``widen(connection)`` gives one connection a
``_write_stream_frame`` that writes a 4-byte length when the frame's data would not fit in
16,383 bytes and is otherwise aioquic's own (net/tls.py checks the internals it uses).
CRYPTO frames keep aioquic's 2-byte length: a handshake flight here is a few hundred bytes
(self-signed Ed25519 certificates, no tickets).
"""

from __future__ import annotations

import types

from aioquic.buffer import size_uint_var
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicFrameType

SHORT_LIMIT = 0x3FFF  # the most a 2-byte varint holds
LONG_FLAG = 0x80000000  # a 4-byte varint's prefix


def widen(connection: QuicConnection) -> None:
    """Let ``connection`` send STREAM frames of more than 16,383 bytes."""
    connection._write_stream_frame = types.MethodType(  # type: ignore[method-assign]
        _write_stream_frame, connection
    )


def _write_stream_frame(self: QuicConnection, builder, space, stream, max_offset: int) -> int:
    """aioquic 1.4-1.7's ``QuicConnection._write_stream_frame``, with a 4-byte length field
    where the room left in the packet is more than a 2-byte one can count."""
    sender = stream.sender
    ids = size_uint_var(stream.stream_id) + (
        size_uint_var(sender.next_offset) if sender.next_offset else 0
    )
    room = builder.remaining_flight_space
    length_size = 4 if room - 1 - 4 - ids > SHORT_LIMIT else 2
    frame_overhead = 1 + length_size + ids
    previous_send_highest = sender.highest_offset
    frame = sender.get_frame(room - frame_overhead, max_offset)
    if frame is None:
        return 0
    frame_type = QuicFrameType.STREAM_BASE | 2  # with a length
    if frame.offset:
        frame_type |= 4
    if frame.fin:
        frame_type |= 1
    buf = builder.start_frame(
        frame_type,
        capacity=frame_overhead,
        handler=sender.on_data_delivery,
        handler_args=(frame.offset, frame.offset + len(frame.data), frame.fin),
    )
    buf.push_uint_var(stream.stream_id)
    if frame.offset:
        buf.push_uint_var(frame.offset)
    if length_size == 4:
        buf.push_uint32(len(frame.data) | LONG_FLAG)
    else:
        buf.push_uint16(len(frame.data) | 0x4000)
    buf.push_bytes(frame.data)
    if self._quic_logger is not None:
        builder.quic_logger_frames.append(
            self._quic_logger.encode_stream_frame(frame, stream_id=stream.stream_id)
        )
    return sender.highest_offset - previous_send_highest
