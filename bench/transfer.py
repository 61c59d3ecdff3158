"""Shard transfer speed and hidden-state round trip between two processes on loopback.

    python bench/transfer.py [--size-mib 256] [--datagram N] [--runs 3] [--rtt-count 2000]
                             [--window-mib 8] [--chunk-kib 1024]

A server process holds one random shard in a real ShardStore (temp dir) and serves it over
OmniNode's authenticated QUIC (net/quic.py + net/transfer.py) and, as the baseline, over
asyncio TLS 1.3 over TCP (ssl module, self-signed certificate) carrying the same frames.
The client (this process) measures, each as the median of --runs runs:

- bulk: fetch_shard of the whole shard into its own ShardStore, BLAKE3-verified and renamed
  (``MB/s`` end to end; ``wire`` excludes the commit, i.e. hashing and fsync); the TLS-TCP
  run writes the same frames into the same kind of store and commits the same way; and
  fetch_shard into a sink that keeps nothing (``no_disk``: the network alone);
- rtt: one HIDDEN frame of shape [1, 576] float16 (1,152 bytes: one SmolLM2 hidden state)
  out and back over a long-lived channel, median over --rtt-count round trips (after a
  warm-up); also over TLS-TCP, and as a request/response on a fresh QUIC stream each.

--datagram sets the UDP payload size of both ends (1452: a LAN-sized datagram; default: what
net/quic.py picks for loopback); --window-mib the bytes per SHARD_READ (both transports),
--chunk-kib the bytes per SHARD_DATA frame. The last line printed is one JSON object.
MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llm_omninode.backend.cid import cid_of
from llm_omninode.backend.store import ShardStore
from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission
from llm_omninode.net.identity import NodeIdentity
from llm_omninode.net.quic import QuicSettings, connect, serve
from llm_omninode.net.settings import LOOPBACK_DATAGRAM_SIZE
from llm_omninode.net.transfer import (
    CHUNK,
    WINDOW,
    ShardSource,
    fetch_shard,
    handle_shard_read,
)

HOST = "127.0.0.1"
HIDDEN_SHAPE = (1, 576)  # SmolLM2-135M: one token's hidden state, float16 -> 1,152 bytes
MB = 1e6


def settings_for(datagram: int | None) -> QuicSettings:
    return QuicSettings(max_datagram_size=datagram, request_timeout=60.0)


# ---- server process -----------------------------------------------------------------------


def self_signed_tls(tmp: Path) -> tuple[Path, Path]:
    """A P-256 certificate for the TLS-TCP baseline (what an ordinary TLS service would use)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "omni-bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("omni-bench")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def serve_tcp_frames(
    store: ShardStore, context: ssl.SSLContext, chunk: int
) -> asyncio.Server:
    """The baseline: the same frames over TLS-over-TCP (SHARD_READ -> SHARD_DATA, HIDDEN echo)."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = F.FrameDecoder()
        try:
            while data := await reader.read(256 * 1024):
                for frame in decoder.feed(data):
                    if frame.type == F.FrameType.HIDDEN:
                        writer.write(F.encode(frame))
                    elif frame.type == F.FrameType.SHARD_READ:
                        await send_range(store, frame, writer, chunk)
                    await writer.drain()
        except (ConnectionError, F.FrameError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_connection, HOST, 0, ssl=context)


async def send_range(
    store: ShardStore, frame: F.Frame, writer: asyncio.StreamWriter, chunk: int
) -> None:
    cid, offset, length = frame.header["cid"], frame.header["offset"], frame.header["length"]
    size = store.size(cid) or 0
    end = min(size, offset + length)
    while offset < end:
        take = min(chunk, end - offset)
        reply = F.shard_data_frame(frame.id, cid, offset, store.read(cid, offset, take), size=size)
        offset += take
        if offset >= end:
            reply = F.Frame(reply.type, reply.header, reply.payload, F.FLAG_LAST)
        prefix, payload = F.encode_parts(reply)
        writer.write(prefix)
        writer.write(payload)
        await writer.drain()


async def server_main() -> None:
    config = json.loads(sys.stdin.readline())
    tmp = Path(config["home"])
    store = ShardStore(tmp / "server")
    data = os.urandom(config["size"])
    cid = cid_of(data)
    store.put_bytes(cid, data)
    del data
    identity = NodeIdentity.generate()
    admission = Admission(secret=bytes.fromhex(config["secret"]))
    chunk = config["chunk"]

    async def handler(peer: str, frame: F.Frame, stream) -> F.Frame | None:
        if frame.type == F.FrameType.SHARD_READ:
            await handle_shard_read(frame, stream, store, chunk=chunk)
            return None
        if frame.type == F.FrameType.REQUEST and frame.header["method"] == "echo":
            return F.response_frame(frame.id, frame.payload)
        if frame.type == F.FrameType.REQUEST and frame.header["method"] == "channel":
            async for item in stream:  # a pipeline edge: every HIDDEN frame straight back
                await stream.send(item)
            return None
        return F.error_frame(F.ErrorCode.UNSUPPORTED, frame.type.name, frame.id)

    quic = await serve(HOST, 0, identity, admission, handler, settings_for(config["datagram"]))
    cert, key = self_signed_tls(tmp)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    tcp = await serve_tcp_frames(store, context, chunk)
    ready = {
        "quic_port": quic.port,
        "tcp_port": tcp.sockets[0].getsockname()[1],
        "node_id": identity.node_id,
        "cid": cid,
        "size": config["size"],
        "cert": str(cert),
    }
    print(json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the client closes our stdin
    quic.close()
    tcp.close()


# ---- client -------------------------------------------------------------------------------


class TimedSink:
    """The client's store, timing the commit (hash + fsync + rename) apart from the wire."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.commit_s = 0.0

    def partial_size(self, cid: str) -> int:
        return self.store.partial_size(cid)

    def append_partial(self, cid: str, offset: int, data: bytes) -> None:
        self.store.append_partial(cid, offset, data)

    def commit_partial(self, cid: str, size: int) -> Path:
        start = time.perf_counter()
        try:
            return self.store.commit_partial(cid, size)
        finally:
            self.commit_s += time.perf_counter() - start

    def discard_partial(self, cid: str) -> None:
        self.store.discard_partial(cid)


class CountingSink:
    """A sink that keeps nothing: the QUIC transfer's speed without the disk (and hash)."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.commit_s = 0.0

    def partial_size(self, cid: str) -> int:
        return self.sizes.get(cid, 0)

    def append_partial(self, cid: str, offset: int, data: bytes) -> None:
        assert offset == self.sizes.get(cid, 0)
        self.sizes[cid] = offset + len(data)

    def commit_partial(self, cid: str, size: int) -> None:
        assert self.sizes.get(cid) == size

    def discard_partial(self, cid: str) -> None:
        self.sizes.pop(cid, None)


async def quic_bulk(
    server: dict, identity, admission, settings, sink: TimedSink | CountingSink, window: int
) -> float:
    conn = await connect(
        HOST, server["quic_port"], identity, admission, server["node_id"], settings
    )
    try:

        async def reuse():
            return conn

        start = time.perf_counter()
        source = ShardSource(conn.peer_id, reuse)
        await fetch_shard(server["cid"], server["size"], [source], sink, window=window)
        return time.perf_counter() - start
    finally:
        await conn.close()


async def tcp_bulk(server: dict, context: ssl.SSLContext, sink: TimedSink, window: int) -> float:
    cid, size = server["cid"], server["size"]
    reader, writer = await asyncio.open_connection(
        HOST, server["tcp_port"], ssl=context, server_hostname="omni-bench"
    )
    try:
        start = time.perf_counter()  # after the handshake, as for QUIC
        offset, request_id = 0, 1
        while offset < size:
            length = min(window, size - offset)
            writer.write(F.encode(F.shard_read_frame(request_id, cid, offset, length)))
            decoder, last = F.FrameDecoder(), False
            while not last:
                data = await reader.read(1024 * 1024)
                if not data:
                    raise ConnectionError("TLS-TCP server went away")
                for frame in decoder.feed(data):
                    if frame.header["offset"] != offset or frame.header["cid"] != cid:
                        raise ValueError("bad SHARD_DATA on the TCP baseline")
                    sink.append_partial(cid, offset, frame.payload)
                    offset += len(frame.payload)
                    last = bool(frame.flags & F.FLAG_LAST)
            request_id += 1
        await asyncio.to_thread(sink.commit_partial, cid, size)
        return time.perf_counter() - start
    finally:
        writer.close()


def hidden() -> F.Frame:
    payload = os.urandom(HIDDEN_SHAPE[0] * HIDDEN_SHAPE[1] * 2)
    return F.hidden_frame("bench", payload, HIDDEN_SHAPE, "float16")


async def quic_rtts(server: dict, identity, admission, settings, count: int) -> dict[str, float]:
    conn = await connect(
        HOST, server["quic_port"], identity, admission, server["node_id"], settings
    )
    try:
        frame = hidden()
        channel = await conn.channel(F.request_frame(conn.next_id(), "channel"))
        samples = []
        for i in range(count + count // 10):
            start = time.perf_counter()
            await channel.send(frame)
            back = await channel.recv(timeout=10)
            if i >= count // 10:  # the first tenth warms up
                samples.append(time.perf_counter() - start)
            assert back is not None and back.payload == frame.payload
        channel.end()
        requests = []
        for i in range(count // 4 + 20):
            start = time.perf_counter()
            reply = await conn.request(F.request_frame(conn.next_id(), "echo", frame.payload))
            if i >= 20:
                requests.append(time.perf_counter() - start)
            assert reply.payload == frame.payload
        return {
            "channel_ms": statistics.median(samples) * 1e3,
            "channel_p90_ms": statistics.quantiles(samples, n=10)[-1] * 1e3,
            "request_ms": statistics.median(requests) * 1e3,
        }
    finally:
        await conn.close()


async def tcp_rtt(server: dict, context: ssl.SSLContext, count: int) -> float:
    reader, writer = await asyncio.open_connection(
        HOST, server["tcp_port"], ssl=context, server_hostname="omni-bench"
    )
    try:
        wire = F.encode(hidden())
        samples = []
        for i in range(count + count // 10):
            start = time.perf_counter()
            writer.write(wire)
            await reader.readexactly(len(wire))
            if i >= count // 10:
                samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3
    finally:
        writer.close()


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) of this process, or of ``pid`` where /proc can tell."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client_main(
    args: argparse.Namespace, server: dict, secret: bytes, tmp: Path, server_pid: int
) -> dict:
    identity = NodeIdentity.generate()
    admission = Admission(secret=secret)
    settings = settings_for(args.datagram)
    context = ssl.create_default_context(cafile=server["cert"])
    size = server["size"]
    window = args.window_mib << 20
    results: dict[str, list[float]] = {}
    for run in range(args.runs):
        for name in ("quic", "tcp", "quic_nodisk"):
            store = ShardStore(tmp / f"client-{name}-{run}")
            sink: TimedSink | CountingSink = TimedSink(store)
            cpu_client, cpu_server = cpu_seconds(), cpu_seconds(server_pid)
            if name == "quic":
                elapsed = await quic_bulk(server, identity, admission, settings, sink, window)
            elif name == "tcp":
                elapsed = await tcp_bulk(server, context, sink, window)
            else:
                sink = CountingSink()
                elapsed = await quic_bulk(server, identity, admission, settings, sink, window)
            if name != "quic_nodisk":
                assert store.has(server["cid"])
                store.remove(server["cid"])  # keep the disk (and page cache) for the next run
            # CPU seconds per GB: what the speed costs, and less bent by other load than MB/s
            client_s = (cpu_seconds() - cpu_client) / (size / 1e9)
            server_now = cpu_seconds(server_pid)
            server_s = (server_now - cpu_server) / (size / 1e9) if server_now is not None else 0.0
            figures = {
                name: size / elapsed / MB,
                f"{name}_wire": size / (elapsed - sink.commit_s) / MB,
                f"{name}_cpu_client": client_s,
                f"{name}_cpu_server": server_s,
            }
            for key, value in figures.items():
                results.setdefault(key, []).append(value)
            print(
                f"run {run + 1}: {name:11} {figures[name]:7.1f} MB/s end to end, "
                f"{figures[f'{name}_wire']:7.1f} MB/s before the commit "
                f"({sink.commit_s:.2f} s hash+fsync+rename); CPU s/GB client {client_s:.2f}, "
                f"server {server_s:.2f}",
                flush=True,
            )
    rtts = await quic_rtts(server, identity, admission, settings, args.rtt_count)
    tcp_rtt_ms = await tcp_rtt(server, context, args.rtt_count)
    medians = {name: statistics.median(values) for name, values in results.items()}
    return {
        "size_mib": size / (1 << 20),
        "datagram": args.datagram or LOOPBACK_DATAGRAM_SIZE,
        "runs": args.runs,
        "window_mib": args.window_mib,
        "chunk_kib": args.chunk_kib,
        "mbps_quic": round(medians["quic"], 1),
        "mbps_tls_tcp": round(medians["tcp"], 1),
        "ratio": round(medians["quic"] / medians["tcp"], 3),
        "mbps_quic_wire": round(medians["quic_wire"], 1),
        "mbps_quic_no_disk": round(medians["quic_nodisk"], 1),
        "cpu_s_per_gb_quic_no_disk_client": round(medians["quic_nodisk_cpu_client"], 2),
        "mbps_tls_tcp_wire": round(medians["tcp_wire"], 1),
        "cpu_s_per_gb_quic_client": round(medians["quic_cpu_client"], 2),
        "cpu_s_per_gb_quic_server": round(medians["quic_cpu_server"], 2),
        "cpu_s_per_gb_tls_tcp_client": round(medians["tcp_cpu_client"], 2),
        "cpu_s_per_gb_tls_tcp_server": round(medians["tcp_cpu_server"], 2),
        "rtt_ms": round(rtts["channel_ms"], 3),
        "rtt_p90_ms": round(rtts["channel_p90_ms"], 3),
        "rtt_request_ms": round(rtts["request_ms"], 3),
        "rtt_tls_tcp_ms": round(tcp_rtt_ms, 3),
        "hidden_bytes": HIDDEN_SHAPE[0] * HIDDEN_SHAPE[1] * 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--datagram", type=int, default=None, help="UDP payload bytes (1452: LAN)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt-count", type=int, default=2000)
    parser.add_argument("--window-mib", type=int, default=WINDOW >> 20)
    parser.add_argument("--chunk-kib", type=int, default=CHUNK >> 10)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(server_main())
        return
    secret = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="omni-bench-") as home:
        config = {
            "home": home,
            "secret": secret.hex(),  # over the pipe, not argv: other users can read argv
            "size": args.size_mib << 20,
            "datagram": args.datagram,
            "chunk": args.chunk_kib << 10,
        }
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            server.stdin.write(json.dumps(config) + "\n")
            server.stdin.flush()
            ready = json.loads(server.stdout.readline())
            print(
                f"shard {ready['cid'][:20]}... {args.size_mib} MiB; datagram "
                f"{config['datagram'] or LOOPBACK_DATAGRAM_SIZE} bytes; {args.runs} runs",
                flush=True,
            )
            figures = asyncio.run(client_main(args, ready, secret, Path(home), server.pid))
        finally:
            with contextlib.suppress(OSError):
                server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    print(
        f"bulk: QUIC {figures['mbps_quic']} MB/s, TLS-TCP {figures['mbps_tls_tcp']} MB/s "
        f"(ratio {figures['ratio']}); before the commit: QUIC {figures['mbps_quic_wire']}, "
        f"TLS-TCP {figures['mbps_tls_tcp_wire']} MB/s; QUIC into no disk "
        f"{figures['mbps_quic_no_disk']} MB/s"
    )
    print(
        f"rtt of a {figures['hidden_bytes']}-byte hidden state: QUIC channel "
        f"{figures['rtt_ms']} ms (p90 {figures['rtt_p90_ms']}), QUIC request "
        f"{figures['rtt_request_ms']} ms, TLS-TCP {figures['rtt_tls_tcp_ms']} ms"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
