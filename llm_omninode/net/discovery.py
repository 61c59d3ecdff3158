"""mDNS (DNS-SD) discovery of OmniNode peers on the LAN, on zeroconf's asyncio API.

Every node advertises one service instance ``<node id>._omninode._udp.local.`` (the node id is
the instance label, so names never clash between nodes) whose SRV points at the QUIC UDP port and
whose TXT record holds::

    id=<node id>  fp=<cluster fingerprint, or "open">  port=<QUIC port>  v=1  name=<human name>

Only the public cluster fingerprint is advertised, never the secret. A peer is listed by
``Discovery.peers()`` only if its TXT decodes cleanly, its fingerprint equals ours, its protocol
version is ours and its instance label is its node id; anything else is logged and ignored.
Discovery is a hint, not trust: the QUIC handshake still checks the node id and membership.

Liveness bound
--------------
zeroconf alone cannot tell when a node died: it pins every PTR record in its cache to at least
1125 s, whatever TTL the peer sent. So liveness is judged on the SRV record, whose TTL is ``ttl``:

* A node that stops cleanly sends goodbyes (TTL 0); it leaves the table as soon as they arrive.
* While a peer's SRV is older than half its lifetime, we multicast SRV and TXT questions for it
  (at most once a second); the peer's multicast answer refreshes every node's cache at once.
* A peer whose SRV has not been heard for ``limit = min(our ttl, its ttl)`` seconds is dropped
  at the next tick (every ``min(1 s, ttl / 4)``).

So a killed node leaves the table at most ``limit + tick`` after its last answer, hence after it
died; :func:`liveness_bound` (``ttl + tick + 1 s`` of scheduling margin) is the bound we promise:
``ttl + 2 s`` for any ttl >= 4, 22 s at the default TTL of 20 s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import (
    DNSOutgoing,
    DNSQuestion,
    InterfaceChoice,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .admission import FINGERPRINT_PREFIX
from .identity import NODE_ID_LENGTH, is_node_id

log = logging.getLogger(__name__)

SERVICE_TYPE = "_omninode._udp.local."
PROTOCOL_VERSION = "1"
OPEN_FINGERPRINT = "open"
MAX_NAME_CHARS = 63
MIN_TTL = 2  # responders multicast a record at most once a second; below 2 s it would flap
MAX_TTL = 4500

# Longest accepted value per TXT key, in bytes (checked before decoding anything).
_TXT_LIMITS = {"id": NODE_ID_LENGTH, "fp": 32, "port": 5, "v": 8, "name": 250}
_REQUIRED = ("id", "fp", "port", "v")
_FINGERPRINT_RE = re.compile(re.escape(FINGERPRINT_PREFIX) + "[a-z2-7]{16}")
_PORT_RE = re.compile("[1-9][0-9]{0,4}")  # canonical decimal: no sign, spaces or leading zeros
_TYPE_TXT, _TYPE_SRV, _CLASS_IN = 16, 33, 1  # DNS numbers (RFC 1035, RFC 2782)
_FLAGS_QUERY = 0x0000
_RESOLVE_TIMEOUT_MS = 3000
_REASK_MS = 1000  # responders ignore repeats within a second anyway (RFC 6762 section 6)


class DiscoveryError(ValueError):
    """A malformed advert or TXT record."""


@dataclass(frozen=True)
class Advert:
    node_id: str
    port: int
    fingerprint: str  # cluster fingerprint, or "open"
    name: str = ""
    version: str = PROTOCOL_VERSION


@dataclass(frozen=True)
class PeerRecord:
    node_id: str
    name: str
    addresses: tuple[str, ...]  # IPv4/IPv6 literals the service resolved to
    port: int
    fingerprint: str
    version: str
    last_seen: float  # time.monotonic() of the peer's latest SRV answer


def liveness_bound(ttl: int) -> float:
    """Seconds after which a killed peer is surely gone from the table (see module docstring)."""
    return ttl + _tick(ttl) + 1.0


def _tick(ttl: int) -> float:
    return min(1.0, ttl / 4)


def _validate(advert: Advert) -> None:
    if not is_node_id(advert.node_id):
        raise DiscoveryError(f"bad node id {advert.node_id!r:.80}")
    port = advert.port
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise DiscoveryError(f"port {port!r:.20} out of range 1..65535")
    fp = advert.fingerprint
    if not isinstance(fp, str) or (fp != OPEN_FINGERPRINT and not _FINGERPRINT_RE.fullmatch(fp)):
        raise DiscoveryError(f"bad cluster fingerprint {fp!r:.40}")
    if advert.version != PROTOCOL_VERSION:
        raise DiscoveryError(f"protocol version {advert.version!r:.20}, not {PROTOCOL_VERSION}")
    name = advert.name
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise DiscoveryError(f"name must be a string of at most {MAX_NAME_CHARS} characters")
    if len(name.encode("utf-8", "surrogatepass")) > _TXT_LIMITS["name"]:
        raise DiscoveryError("name too long in UTF-8 for one TXT string")
    if not name.isprintable():  # names end up in terminals and logs
        raise DiscoveryError(f"name has control characters: {name!r}")


def encode_txt(advert: Advert) -> dict[str, str]:
    """The TXT properties advertising ``advert``; DiscoveryError if it is not advertisable."""
    _validate(advert)
    return {
        "id": advert.node_id,
        "fp": advert.fingerprint,
        "port": str(advert.port),
        "v": advert.version,
        "name": advert.name,
    }


def decode_txt(properties: Mapping[bytes, bytes | None]) -> Advert:
    """The advert in a peer's TXT properties; DiscoveryError on anything malformed.

    Keys are case-insensitive and the first occurrence wins (RFC 6763 section 6.4); unknown
    keys are ignored so later versions can add some.
    """
    fields: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        if not isinstance(raw_key, bytes | bytearray):
            raise DiscoveryError("TXT keys must be bytes")
        key = bytes(raw_key).lower().decode("ascii", "replace")
        if key not in _TXT_LIMITS or key in fields:
            continue
        if raw_value is None:
            raise DiscoveryError(f"TXT key {key!r} has no value")
        if not isinstance(raw_value, bytes | bytearray):
            raise DiscoveryError(f"TXT value of {key!r} is not bytes")
        if len(raw_value) > _TXT_LIMITS[key]:
            raise DiscoveryError(f"TXT value of {key!r} too long ({len(raw_value)} bytes)")
        try:
            fields[key] = bytes(raw_value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DiscoveryError(f"TXT value of {key!r} is not UTF-8") from exc
    missing = [key for key in _REQUIRED if key not in fields]
    if missing:
        raise DiscoveryError(f"TXT record lacks {', '.join(missing)}")
    if not _PORT_RE.fullmatch(fields["port"]):
        raise DiscoveryError(f"port {fields['port']!r} is not a decimal port number")
    advert = Advert(
        node_id=fields["id"],
        port=int(fields["port"]),
        fingerprint=fields["fp"],
        name=fields.get("name", ""),
        version=fields["v"],
    )
    _validate(advert)
    return advert


def _local_addresses() -> list[str]:
    """This host's addresses worth advertising when mDNS runs on all interfaces."""
    import ifaddr  # zeroconf's own dependency

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ipaddress.ip_address(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
            # IPv6 link-local would need the receiver's scope id, which it cannot know
            if addr.is_loopback or (addr.version == 6 and addr.is_link_local):
                continue
            found.append(str(addr))
    return found


def _shape(peers: Mapping[str, PeerRecord]) -> dict[str, tuple]:
    """A peer table without last_seen, to tell real changes from refreshes."""
    return {k: (p.name, p.addresses, p.port, p.fingerprint, p.version) for k, p in peers.items()}


class Discovery:
    """Advertise this node and track live peers of the same cluster."""

    def __init__(
        self,
        advert: Advert,
        *,
        interfaces: Sequence[str] | None = None,
        ttl: int = 20,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._txt = encode_txt(advert)  # refuse a bad advert now, not after start()
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be an integer in {MIN_TTL}..{MAX_TTL} seconds")
        self._interfaces = None
        if interfaces is not None:
            self._interfaces = [str(ipaddress.ip_address(addr)) for addr in interfaces]
            if not self._interfaces:
                raise ValueError("interfaces: give at least one address, or None for all")
        self.advert = advert
        self.ttl = ttl
        self._on_change = on_change
        self._instance = f"{advert.node_id}.{SERVICE_TYPE}"
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()
        self._resolving: set[str] = set()
        self._names: set[str] = set()  # instances (lower case) the browser reported, not withdrawn
        self._peers: dict[str, PeerRecord] = {}  # node id -> record
        self._ignored: dict[str, str] = {}  # instance -> why, so each reason is logged once
        self._asked: dict[str, float] = {}  # instance -> when we last asked for it (ms)

    async def start(self) -> None:
        """Browse for peers and register our service (after probing that its name is free)."""
        if self._azc is not None:
            raise RuntimeError("discovery already started")
        if self._interfaces is None:
            azc = AsyncZeroconf(interfaces=InterfaceChoice.All)
            addresses = _local_addresses()
        else:
            azc = AsyncZeroconf(interfaces=self._interfaces)
            addresses = list(self._interfaces)
        self._azc = azc
        try:
            # browse first: peers answer while our own name is still being probed
            self._browser = AsyncServiceBrowser(
                azc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
            )
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                self._instance,
                port=self.advert.port,
                properties=self._txt,
                server=f"{self.advert.node_id}.local.",
                host_ttl=self.ttl,
                other_ttl=self.ttl,
                parsed_addresses=addresses,
            )
            if not addresses:
                log.warning("discovery: no address to advertise; peers cannot reach this node")
            # returns once the name is ours; the announcements it started go on by themselves
            await azc.async_register_service(info)
            self._spawn(self._tick_loop())
        except BaseException:
            await self.stop()
            raise
        log.info("discovery: advertising %s on port %d", self.advert.node_id, self.advert.port)

    async def stop(self) -> None:
        """Say goodbye (TTL 0 records) and close. Safe to call twice."""
        azc, self._azc = self._azc, None
        if azc is None:
            return
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            await azc.async_unregister_all_services()
        finally:
            self._browser = None
            await azc.async_close()
            self._peers, self._names, self._ignored, self._asked = {}, set(), {}, {}

    def peers(self) -> list[PeerRecord]:
        """Live peers of our cluster, without ourselves, sorted by node id."""
        return [self._peers[node_id] for node_id in sorted(self._peers)]

    # -- events ---------------------------------------------------------------------------------

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self._azc is None:
            return
        name = name.lower()
        if state_change is ServiceStateChange.Removed:
            self._names.discard(name)  # a goodbye: drop now, not at the next tick
            self._reconcile()
            return
        self._names.add(name)
        if name not in self._resolving:
            self._resolving.add(name)
            self._spawn(self._resolve(name))

    async def _resolve(self, name: str) -> None:
        """Fetch whatever records of ``name`` the cache lacks, then update the table."""
        try:
            if self._azc is not None:
                await AsyncServiceInfo(SERVICE_TYPE, name).async_request(
                    self._azc.zeroconf, _RESOLVE_TIMEOUT_MS
                )
        except Exception as exc:  # a bad name from the wire, or zeroconf closing under us
            log.debug("discovery: cannot resolve %s: %s", name, exc)
        finally:
            self._resolving.discard(name)
        self._reconcile()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_tick(self.ttl))
            try:
                self._reconcile()
            except Exception:  # never let one bad record stop liveness tracking
                log.exception("discovery: updating the peer table failed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # keep a reference so the task is not collected mid-flight
        task.add_done_callback(self._tasks.discard)

    # -- the peer table -------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Rebuild the table from zeroconf's cache and ask for records about to go stale."""
        if self._azc is None or self._azc.zeroconf.done:
            return
        zc = self._azc.zeroconf
        now_ms = current_time_millis()
        peers: dict[str, PeerRecord] = {}
        stale: list[str] = []
        for name in sorted(self._names):
            record, refresh = self._examine(zc, name, now_ms)
            if record is not None:
                peers[record.node_id] = record
            if refresh:
                stale.append(name)
        for table in (self._ignored, self._asked):  # forget withdrawn instances
            for name in [n for n in table if n not in self._names]:
                del table[name]
        self._ask(zc, stale, now_ms)
        old, self._peers = self._peers, peers
        if _shape(old) == _shape(peers):
            return
        for node_id in old.keys() - peers.keys():
            log.info("discovery: peer %s left", node_id)
        for node_id in peers.keys() - old.keys():
            peer = peers[node_id]
            log.info("discovery: peer %s at %s port %d", node_id, peer.addresses, peer.port)
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("discovery: on_change callback failed")

    def _examine(self, zc: Zeroconf, name: str, now_ms: float) -> tuple[PeerRecord | None, bool]:
        """The live, acceptable peer behind ``name`` (or None), and whether to re-ask for it."""
        if name == self._instance.lower() or not name.endswith("." + SERVICE_TYPE):
            return None, False
        cached = zc.cache.async_all_by_details(name, _TYPE_SRV, _CLASS_IN)
        srvs = [r for r in cached if not r.is_expired(now_ms)]
        if not srvs:  # said goodbye or expired; if it comes back it announces itself
            return None, False
        srv = max(srvs, key=lambda r: r.created)
        age_ms = now_ms - srv.created
        limit_ms = min(self.ttl, srv.ttl) * 1000  # our own bound even if the peer's TTL is long
        if age_ms > limit_ms:
            return None, False
        refresh = age_ms > limit_ms / 2
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zc, now_ms):
            return None, refresh  # TXT or addresses not here yet; _resolve is fetching them
        try:
            advert = decode_txt(info.properties)
        except DiscoveryError as exc:
            self._ignore(name, f"malformed TXT: {exc}", logging.INFO)
            return None, False
        label = name[: -len(SERVICE_TYPE) - 1]
        if label != advert.node_id:
            self._ignore(name, f"instance name is not its node id {advert.node_id}", logging.INFO)
            return None, False
        if advert.fingerprint != self.advert.fingerprint:
            self._ignore(name, f"other cluster ({advert.fingerprint})", logging.DEBUG)
            return None, False
        self._ignored.pop(name, None)
        addresses = tuple(info.parsed_scoped_addresses())
        if not addresses:
            return None, refresh
        last_seen = time.monotonic() - max(0.0, age_ms) / 1000
        record = PeerRecord(
            node_id=advert.node_id,
            name=advert.name,
            addresses=addresses,
            port=advert.port,
            fingerprint=advert.fingerprint,
            version=advert.version,
            last_seen=last_seen,
        )
        return record, refresh

    def _ignore(self, name: str, reason: str, level: int) -> None:
        if self._ignored.get(name) != reason:
            self._ignored[name] = reason
            log.log(level, "discovery: ignoring %s: %s", name, reason)

    def _ask(self, zc: Zeroconf, names: list[str], now_ms: float) -> None:
        """Multicast SRV and TXT questions for peers whose records are getting old."""
        due = [n for n in names if now_ms - self._asked.get(n, float("-inf")) >= _REASK_MS]
        if not due:
            return
        out = DNSOutgoing(_FLAGS_QUERY)  # a QM question: the answer is multicast to everyone
        for name in due:
            self._asked[name] = now_ms
            out.add_question(DNSQuestion(name, _TYPE_SRV, _CLASS_IN))
            out.add_question(DNSQuestion(name, _TYPE_TXT, _CLASS_IN))
        zc.async_send(out)
