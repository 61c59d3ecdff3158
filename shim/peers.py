"""The peer table: which nodes this shim knows, how to reach them, and what they hold.

Peers come from three places: mDNS discovery (same cluster fingerprint only), ``--peer
HOST:PORT`` given on the command line, and nodes that said HELLO to us (so a node started with
``--peer`` is known to the node it names). Each is greeted with HELLO; its INFO answer
(device, memory budget, shards held) and the round trip of that exchange are kept. A peer that
has not answered for ``stale_after`` seconds is no longer live: the planner stops counting on
it, and it is forgotten unless it is a static peer or still advertised.

One QUIC connection per peer is kept and reused; it is re-opened when it drops.

A peer that refuses us (or that we refuse) at admission says why in the close of the
connection; the reason is kept on its row (``error``: "refused by node1 (HOST:PORT): bad
cluster proof ...") and logged once. A ``--peer`` address that refuses us before we ever got
in has no node id we could key it by: it gets a row of its own, with an empty ``node_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission
from llm_omninode.net.identity import NodeIdentity, is_node_id
from llm_omninode.net.quic import (
    PORT_UNREACHABLE,
    CloseCode,
    Connection,
    NetError,
    PeerRefused,
    QuicSettings,
    connect,
)

log = logging.getLogger("omninode_shim.peers")

PROTOCOL_VERSION = "1"
MAX_SPEED = 1e9  # a speed figure past this is garbage, not a device


@dataclass
class Peer:
    node_id: str
    host: str
    port: int
    source: str  # "mdns" | "static" | "hello"
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # the last INFO header
    rtt_ms: float | None = None
    last_ok: float | None = None  # time.monotonic() of the last answer
    error: str | None = None
    left: bool = False  # said it was leaving: not greeted until it greets us again

    @property
    def memory_budget(self) -> int:
        """What the peer offers; 0 (not planned on) unless a sane byte count."""
        value = self.info.get("memory_budget")
        return value if type(value) is int and 0 < value <= 2**62 else 0

    @property
    def runtime(self) -> int:
        """What the peer's process held before any stage (0 if it does not say)."""
        value = self.info.get("runtime")
        return value if type(value) is int and 0 <= value <= 2**62 else 0

    @property
    def speed(self) -> float:
        """The peer's measured speed (llm_omninode/backend/speed.py); 1.0 unless a sane
        positive number."""
        value = self.info.get("speed")
        if not isinstance(value, int | float) or isinstance(value, bool):
            return 1.0
        return float(value) if math.isfinite(value) and 0 < value <= MAX_SPEED else 1.0

    @property
    def shards(self) -> frozenset[str]:
        value = self.info.get("shards")
        return frozenset(value) if isinstance(value, list) else frozenset()

    def row(self) -> dict[str, Any]:
        """What ``llm omni peers`` shows of it."""
        return {
            "node_id": self.node_id,
            "name": self.name or self.info.get("name", ""),
            "address": f"{self.host}:{self.port}",
            "device": self.info.get("device", ""),
            "memory_budget": self.memory_budget,
            "speed": self.speed,
            "stages": self.info.get("stages", []),
            **{k: _count(self.info.get(k)) for k in ("runtime", "planned", "rss", "peak")},
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "source": self.source,
            "error": self.error,
        }


def refusal(exc: NetError, where: str) -> str | None:
    """Why an admission failed, for a peer's row: "refused by WHERE: REASON" (the peer closed
    the handshake on us, saying why) or "we refused WHERE: REASON" (our admission said no);
    None for any other failure (unreachable, timed out)."""
    if not isinstance(exc, PeerRefused) or exc.code == CloseCode.NO_ERROR:
        return None
    reason = exc.reason
    if reason.startswith("server closed: "):
        return f"refused by {where}: {reason.removeprefix('server closed: ') or exc}"
    if reason.startswith("we refused "):
        return f"we refused {where}: {reason.partition(': ')[2] or reason}"
    return f"refused by {where}: {reason}"


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; ValueError with the reason."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class PeerTable:
    def __init__(
        self,
        identity: NodeIdentity,
        admission: Admission,
        settings: QuicSettings,
        *,
        hello_fields: Callable[[], dict[str, Any]],
        stale_after: float = 20.0,
    ) -> None:
        self.identity = identity
        self.admission = admission
        self.settings = settings
        self.hello_fields = hello_fields  # our port and name, sent with every HELLO
        self.stale_after = stale_after
        self._peers: dict[str, Peer] = {}
        self._static: list[tuple[str, int]] = []
        self._connections: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        # --peer addresses whose node refused us (or we it) before its id was ever known
        self._refused: dict[tuple[str, int], Peer] = {}

    # ---- who is there -------------------------------------------------------------------
    def add_static(self, host: str, port: int) -> None:
        self._static.append((host, port))

    def note(self, node_id: str, host: str, port: int, source: str, name: str = "") -> Peer | None:
        """Learn (or update) where a node is. Our own id and malformed ids are ignored."""
        if node_id == self.identity.node_id or not is_node_id(node_id):
            return None
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = Peer(node_id, host, port, source, name)
            log.info("peer %s (%s) at %s:%d via %s", name or "?", node_id[:16], host, port, source)
        elif (peer.host, peer.port) != (host, port):
            peer.host, peer.port = host, port
            self._drop_connection(node_id)
        if name:
            peer.name = name
        return peer

    def forget(self, node_id: str) -> None:
        if self._peers.pop(node_id, None) is not None:
            log.info("peer %s gone", node_id[:16])
        self._drop_connection(node_id)

    def get(self, node_id: str) -> Peer | None:
        return self._peers.get(node_id)

    def mark_down(self, node_id: str, why: str) -> None:
        """A node that stopped answering: not live (not planned on, not asked for shards)
        until a greeting succeeds again; waiting steps on its connection fail now."""
        peer = self._peers.get(node_id)
        if peer is not None and peer.last_ok is not None:
            log.warning("peer %s (%s) is down: %s", peer.name or "?", node_id[:16], why)
            peer.last_ok, peer.error = None, why
        self._drop_connection(node_id)

    def mark_left(self, node_id: str) -> None:
        """The node said it is shutting down: down now, and not greeted back to life while
        it finishes closing (a HELLO from it, when it starts again, clears this)."""
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.left = True
        self.mark_down(node_id, "left the cluster")

    def back(self, node_id: str) -> None:
        """The node greeted us: whatever it said before, it is here."""
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.left = False

    def lost(self, node_id: str, why: str) -> None:
        """A connection with ``node_id`` (ours or its) found it gone. Its port unreachable:
        the process died, so it is down until greeted again. Silent past the transport's
        bound: maybe only starved of CPU, so the connection goes but the next question
        (``alive``, a HELLO) decides."""
        peer = self._peers.get(node_id)
        if peer is None:
            return
        if PORT_UNREACHABLE in why:
            self.mark_down(node_id, f"lost: {why}")
        else:
            peer.error = f"connection lost: {why}"
            self._drop_connection(node_id)

    def heard(self, node_id: str) -> float | None:
        """time.monotonic() of the last packet from ``node_id`` on our open connection to it
        (pings are answered every second or so), else of its last HELLO answer."""
        peer = self._peers.get(node_id)
        if peer is None or peer.last_ok is None:
            return None
        conn = self._connections.get(node_id)
        return max(peer.last_ok, conn.last_received if conn and not conn.closed else 0.0)

    async def alive(self, node_id: str, timeout: float, lost_after: float) -> bool:
        """Whether ``node_id`` is still there: it answers a HELLO within ``timeout`` s, or our
        connection to it is open and heard from within ``lost_after`` s (its event loop
        answers pings even while it computes, and the transport closes a connection to a dead
        or silent node). A node marked down (it left, or was found lost) is not alive until it
        answers again."""
        peer = self._peers.get(node_id)
        if peer is None or peer.left or peer.last_ok is None:
            return False  # unknown, leaving, or found dead (the next greeting revives it)
        try:  # a dead process's port answers the HELLO with ICMP at once: False
            if await asyncio.wait_for(self.greet(peer, timeout=timeout), timeout + 1.0):
                return True
        except asyncio.TimeoutError:  # connecting itself hung
            pass
        if peer.last_ok is None:  # found lost meanwhile
            return False
        # no answer in time: a node starved of CPU may still answer the transport's pings
        conn = self._connections.get(node_id)
        heard = self.heard(node_id)
        return (
            conn is not None
            and not conn.closed
            and heard is not None
            and time.monotonic() - heard <= lost_after
        )

    def live(self) -> list[Peer]:
        """Peers greeted and heard from (a HELLO answer, or any packet on our connection)
        within ``stale_after``: a node too busy to answer HELLO in time still answers pings."""
        now = time.monotonic()
        return sorted(
            (
                p
                for p in self._peers.values()
                if (heard := self.heard(p.node_id)) is not None and now - heard <= self.stale_after
            ),
            key=lambda p: p.node_id,
        )

    def all(self) -> list[Peer]:
        """Every peer known, then a row (``node_id`` "") per ``--peer`` address that refused
        us before we learned who it is: ``llm omni peers`` shows why."""
        known = {(p.host, p.port) for p in self._peers.values()}
        refused = [p for a, p in self._refused.items() if a not in known]
        return sorted(self._peers.values(), key=lambda p: p.node_id) + refused

    def _note_error(self, peer: Peer, exc: BaseException) -> None:
        """Keep why ``peer`` cannot be reached; a refusal (a reason the other side gave, or
        ours) is logged as a warning when it first appears, not every round."""
        where = f"{peer.host}:{peer.port}"
        if peer.name:
            where = f"{peer.name} ({where})"
        text = refusal(exc, where) if isinstance(exc, NetError) else None
        if text is not None:
            if text != peer.error:
                log.warning("%s%s", f"peer {peer.node_id[:16]}: " if peer.node_id else "", text)
            peer.error = text
            return
        peer.error = str(exc) or type(exc).__name__
        log.info("peer %s did not answer HELLO: %s", peer.node_id[:16] or where, peer.error)

    # ---- connections --------------------------------------------------------------------
    async def connection(self, node_id: str) -> Connection:
        """An admitted connection to ``node_id`` (reused; re-opened if it dropped)."""
        conn = self._connections.get(node_id)
        if conn is not None and not conn.closed:
            return conn
        lock = self._connecting.setdefault(node_id, asyncio.Lock())
        async with lock:
            conn = self._connections.get(node_id)
            if conn is not None and not conn.closed:
                return conn
            peer = self._peers.get(node_id)
            if peer is None:
                raise NetError(f"unknown peer {node_id}")
            conn = await connect(
                peer.host,
                peer.port,
                self.identity,
                self.admission,
                expected_node_id=node_id,
                settings=self.settings,
                on_lost=self.lost,
            )
            self._connections[node_id] = conn
            return conn

    def _drop_connection(self, node_id: str) -> None:
        conn = self._connections.pop(node_id, None)
        if conn is not None:
            task = asyncio.get_running_loop().create_task(conn.close())
            task.add_done_callback(lambda t: t.exception())

    async def close(self) -> None:
        conns, self._connections = list(self._connections.values()), {}
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()

    # ---- what the peers hold -------------------------------------------------------------
    async def model_aliases(self) -> dict[str, str]:
        """alias -> model id, as the live peers report them (first answer wins)."""
        found: dict[str, str] = {}
        for peer in self.live():
            try:
                conn = await self.connection(peer.node_id)
                reply = await conn.request(F.request_frame(conn.next_id(), "models"), timeout=5.0)
            except NetError as exc:
                log.debug("no model list from %s: %s", peer.node_id[:16], exc)
                continue
            models = reply.header.get("models")
            if isinstance(models, dict):
                for alias, model_id in list(models.items())[:1000]:
                    if isinstance(alias, str) and isinstance(model_id, str):
                        found.setdefault(alias, model_id)
        return found

    # ---- greeting -----------------------------------------------------------------------
    def _hello(self, conn: Connection) -> F.Frame:
        frame = F.hello_frame(conn.next_id(), self.identity.node_id, PROTOCOL_VERSION)
        frame.header.update(self.hello_fields())
        return frame

    async def greet(self, peer: Peer, timeout: float = 5.0) -> bool:
        """HELLO -> INFO: refresh what we know of ``peer`` and its round trip."""
        if peer.left:
            return False
        try:
            conn = await self.connection(peer.node_id)
            t0 = time.perf_counter()
            info = await conn.request(self._hello(conn), timeout=timeout)
            rtt = (time.perf_counter() - t0) * 1000
        except (NetError, OSError, asyncio.TimeoutError) as exc:
            self._note_error(peer, exc)
            return False
        if info.type != F.FrameType.INFO or info.header.get("node_id") != peer.node_id:
            peer.error = "answered HELLO with something other than its INFO"
            return False
        peer.info, peer.rtt_ms, peer.last_ok, peer.error = info.header, rtt, time.monotonic(), None
        if isinstance(info.header.get("name"), str):
            peer.name = info.header["name"][:63]
        return True

    async def _probe_static(self, host: str, port: int) -> None:
        """A static peer's node id is learned from its certificate (admission proves it is
        one of ours), then it is a peer like any other."""
        try:
            conn = await connect(
                host, port, self.identity, self.admission, settings=self.settings,
                on_lost=self.lost,
            )  # fmt: skip
        except (NetError, OSError) as exc:
            row = self._refused.get((host, port))
            if row is None and isinstance(exc, NetError) and refusal(exc, "") is not None:
                row = self._refused[(host, port)] = Peer("", host, port, "static")
            if row is not None:  # refused once: keep saying why it is not in
                self._note_error(row, exc)
            else:
                log.debug("static peer %s:%d not reachable: %s", host, port, exc)
            return
        self._refused.pop((host, port), None)
        peer = self.note(conn.peer_id, host, port, "static")
        if peer is None:  # ourselves
            await conn.close()
            return
        old = self._connections.get(peer.node_id)
        if old is not None and not old.closed:
            await conn.close()
        else:
            self._connections[peer.node_id] = conn

    async def refresh(self) -> None:
        """Probe static addresses not yet known, greet every peer, forget long-silent ones."""
        known = {(p.host, p.port) for p in self._peers.values()}
        await asyncio.gather(
            *(self._probe_static(h, p) for h, p in self._static if (h, p) not in known)
        )
        peers = list(self._peers.values())
        await asyncio.gather(*(self.greet(p) for p in peers))
        now = time.monotonic()
        static = set(self._static)
        for p in peers:
            # a dead or silent node's connection is the transport's to drop (a killed one at
            # once, a silent one after its lost_after), not a slow HELLO's: a node starved of
            # CPU may miss HELLOs while it still answers pings and computes its steps
            silent = now - (self.heard(p.node_id) or 0.0)
            if (
                (p.host, p.port) not in static
                and p.source == "hello"
                and silent > 3 * self.stale_after
            ):
                self.forget(p.node_id)


def _count(value: object) -> int | None:
    """A byte count from a peer's INFO, None unless a sane int."""
    return value if type(value) is int and 0 <= value <= 2**62 else None
