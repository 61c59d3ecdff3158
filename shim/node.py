"""One OmniNode node: identity, QUIC endpoint, discovery, peers, shard store, stages, the
models it coordinates (shim/lifecycle.py) and their generations (shim/generation.py).

Requests it serves (one QUIC stream each; every one from an admitted peer only):

=================  ==========================================================================
HELLO              -> INFO: node id, version, device, memory budget, speed, shards held, stages,
                      name
SHARD_READ         -> SHARD_DATA frames: a range of a shard it holds (net/transfer.py)
``generate``       -> STREAM_DATA per text chunk, STREAM_END with the reason and token counts;
                      while the model loads first, STREAM_DATA frames with no text and a
                      ``progress`` field (shim/load_progress.py)
``embed``          -> the texts' embeddings (shim/embedding.py ``serve_embed``)
``peers``          -> this node and the peers it knows (``llm omni peers``)
``status``         -> plans made here and stages hosted here (``llm omni status``)
``models``         -> alias -> model id of the models held here
``manifest``       -> a model's manifest (the asker checks it hashes to the model id)
``stage.load``     -> load blocks [start, end) of the model whose manifest is the payload;
                      asked with ``progress``, STREAM_DATA frames of its shard bytes first
``stage.unload``   -> drop a stage hosted here (keep-alive ran out, or ``keep_alive: 0``)
``leaving``        -> the asking peer is shutting down: stop planning on it
``pipeline``       -> a channel: one sequence's steps through a stage hosted here
=================  ==========================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_omninode import __version__
from llm_omninode.backend.registry import ModelNotFound, ModelRegistry
from llm_omninode.backend.shards import Manifest, ManifestError
from llm_omninode.backend.speed import measure as measure_speed
from llm_omninode.backend.stage_engine import engine_name
from llm_omninode.backend.stage_engine import preload as preload_engine
from llm_omninode.backend.tool_calls import calls_json
from llm_omninode.home import SHIM_STATE_FILE
from llm_omninode.net import frames as F
from llm_omninode.net.admission import Admission, create_cluster_secret, save_cluster_secret
from llm_omninode.net.frames import ErrorCode, Frame, FrameType
from llm_omninode.net.gates import PeerGates
from llm_omninode.net.identity import load_or_create_identity
from llm_omninode.net.quic import FrameStream, QuicSettings, Server, serve
from llm_omninode.net.transfer import ShardSource, handle_shard_read
from llm_omninode.request import GenerationRequest, RequestError

from .api_runner import ApiRunner
from .embedding import Embedder, serve_embed
from .errors import CoordinatorError
from .generation import DEFAULT_PARALLEL, Generations
from .http.server import ApiConfig, ApiServer
from .http.service import ApiService
from .lifecycle import ModelLifecycle
from .load_progress import REPORT_EVERY, LoadProgress
from .metrics import Metrics, NodeGauges
from .peers import PeerTable, parse_host_port
from .pipeline import serve_pipeline
from .process import device_name, peak_bytes, physical_memory, resident_bytes
from .request_log import RequestLog
from .snapshot import ClusterView
from .stage_host import StageError, StageHost

log = logging.getLogger("omninode_shim")

DEFAULT_PORT = 7341
REFRESH_S = 5.0  # how often peers are greeted (liveness, INFO, round trip)
# requests of these kinds one peer may have running at once; more wait (net/gates.py). A
# fetching node reads 4 shards at a time per stage load (net/transfer.py); each read holds at
# most QuicSettings.send_high_water + one chunk until the peer reads it.
PEER_LIMITS = {"shard_read": 8, "stage.load": 4}


@dataclass
class NodeConfig:
    data_dir: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    join: str | None = None
    open: bool = False
    peers: list[str] = field(default_factory=list)
    max_memory: int | None = None  # bytes; default: half the physical memory
    name: str = ""
    mdns: bool = True
    mdns_interfaces: list[str] | None = None  # addresses to run mDNS on; None: all
    max_context: int | None = None
    advertise_host: str | None = None  # the address peers should use for us, if not obvious
    api: ApiConfig | None = field(default_factory=ApiConfig)  # None: no HTTP API
    parallel: int = DEFAULT_PARALLEL  # sequences of one model coordinated here at once
    prefix_reuse: bool = True  # keep finished sequences' caches for a next turn
    threads: int | None = None  # of a stage's compute (None: OMNI_GGML_THREADS, else all CPUs)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.identity = load_or_create_identity(data)
        self.node_id = self.identity.node_id
        # mDNS TXT values are short: a long host name is cut, not a reason to fail
        self.name = (config.name or socket.gethostname().split(".")[0])[:63]
        self.admission = self._admission()
        self.registry = ModelRegistry(data)
        self.store = self.registry.store
        self.memory_budget = config.max_memory or physical_memory() // 2
        self.max_context = config.max_context
        self.settings = QuicSettings()
        self.peers = PeerTable(
            self.identity, self.admission, self.settings, hello_fields=self._hello_fields
        )
        for text in config.peers:
            self.peers.add_static(*parse_host_port(text))
        self.metrics = Metrics()  # /metrics; memory, peers and generations read when scraped
        self.host = StageHost(
            self.store,
            self.memory_budget,
            max_context=config.max_context,
            sequences=config.parallel,
            threads=config.threads,
            metrics=self.metrics,
        )
        self.speed = 1.0  # measured at start (backend/speed.py): planners share work by it
        # the models coordinated here (plans, loads, keep-alive), and their generations
        self.lifecycle = ModelLifecycle(
            self.node_id, self.name, self.memory_budget, lambda: self.speed, self.host,
            self.peers, self.registry, self.held_shards, self.shard_sources,
        )  # fmt: skip
        self.generations = Generations(
            self.lifecycle, self.node_id, lambda: (self.advertised_host, self.port), self.host,
            self.peers, self.metrics, config.max_context, config.parallel, config.prefix_reuse,
        )  # fmt: skip
        self.embedder = Embedder(
            self.lifecycle, self.generations.here, self.generations.route, config.max_context
        )
        self.pipelines = 0  # pipeline channels being served now (``status`` shows it)
        # generations coordinated here (the cluster page's; each one's figures to /metrics)
        self.requests = RequestLog(on_finish=self.metrics.finished)
        self.device = device_name(engine_name())
        self.metrics.watch(
            NodeGauges(
                memory=lambda: {"budget": self.memory_budget, **self.memory_fields()},
                live_peers=lambda: len(self.peers.live()),
                running=self.generations.running,
            )
        )
        self.server: Server | None = None
        self.discovery = None  # net.discovery.Discovery when mDNS is on
        self.api: ApiServer | None = None  # when the HTTP API is on
        self.port = config.port
        self._tasks: list[asyncio.Task] = []
        self._gates = PeerGates(PEER_LIMITS)
        self._file_backed: dict[str, tuple[str, ...]] = {}
        self._stopped = asyncio.Event()

    def _admission(self) -> Admission:
        data = self.config.data_dir
        if self.config.join:
            save_cluster_secret(data, self.config.join)
        admission = Admission.from_home(data, open=self.config.open)
        if admission.secret is None and not admission.open and not admission.trusted:
            # first start of a new cluster: make its secret and show it, this once
            text = create_cluster_secret(data)
            print(
                f"omni-shim: created a new cluster. Its secret, shown only now:\n\n  {text}\n\n"
                "Give it to the other nodes: omni-shim --join SECRET (or llm omni join SECRET).",
                flush=True,
            )
            admission = Admission.from_home(data, open=self.config.open)
        return admission

    @property
    def advertised_host(self) -> str:
        if self.config.advertise_host:
            return self.config.advertise_host
        if self.config.host not in ("0.0.0.0", "::", ""):
            return self.config.host
        return "127.0.0.1"

    # ---- what we tell peers -------------------------------------------------------------
    def _hello_fields(self) -> dict[str, Any]:
        return {"port": self.port, "name": self.name, "role": "node"}

    def held_shards(self) -> list[str]:
        """Shards stored here plus those served from local GGUF files (what INFO lists)."""
        cids = set(self.store.shards())
        for model_id in self.store.manifests():
            if model_id not in self._file_backed:  # manifests are immutable: parse once
                shards: tuple[str, ...] = ()
                if self.store.file_source(model_id) is not None:
                    with contextlib.suppress(ManifestError, OSError, ValueError):
                        shards = tuple(s.cid for s in self.store.get_manifest(model_id).shards)
                self._file_backed[model_id] = shards
            cids.update(self._file_backed[model_id])
        return sorted(cids)

    def info(self, request_id: int) -> Frame:
        return F.info_frame(
            request_id,
            self.node_id,
            __version__,
            self.device,
            self.memory_budget,
            self.held_shards(),
            name=self.name,
            port=self.port,
            stages=[h.row() for h in self.host.stages()],
            memory_used=self.host.used_bytes(),
            speed=self.speed,
            **self.memory_fields(),
        )

    def memory_fields(self) -> dict[str, int]:
        """What ``llm omni peers`` shows of this node's memory, and what planners use: the
        runtime is what the process held at start, before any stage."""
        return {
            "runtime": self.host.runtime,
            "planned": self.host.planned_bytes(),
            "rss": resident_bytes(),
            "peak": peak_bytes(),
        }

    def self_row(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "address": f"{self.advertised_host}:{self.port}",
            "device": self.device,
            "memory_budget": self.memory_budget,
            "speed": self.speed,
            "stages": [h.row() for h in self.host.stages()],
            **self.memory_fields(),
            "rtt_ms": 0.0,
            "source": "self",
        }

    def shard_sources(self, cid: str) -> list[ShardSource]:
        """Peers that say they hold ``cid`` first, then every other live peer."""
        live = self.peers.live()
        holders = [p for p in live if cid in p.shards]
        others = [p for p in live if cid not in p.shards]
        return [ShardSource(p.node_id, self._connector(p.node_id)) for p in holders + others]

    def _connector(self, node_id: str):
        async def connect():
            return await self.peers.connection(node_id)

        return connect

    # ---- requests -----------------------------------------------------------------------
    async def handle(self, peer_id: str, frame: Frame, stream: FrameStream) -> Frame | None:
        if frame.type == FrameType.HELLO:
            self._note_hello(frame, stream)
            return self.info(frame.id or 0)
        if frame.type == FrameType.SHARD_READ:
            async with self._gates.slot(peer_id, "shard_read"):
                await handle_shard_read(frame, stream, self.store)
            return None
        if frame.type != FrameType.REQUEST:
            return F.error_frame(ErrorCode.UNSUPPORTED, f"{frame.type.name} is not served here")
        method = frame.header["method"]
        try:
            if method == "generate":
                return await self._generate(frame, stream)
            if method == "embed":
                return await serve_embed(self.embedder, frame)
            if method == "pipeline":
                self.pipelines += 1
                try:
                    return await serve_pipeline(self.host, self.peers, self.node_id, frame, stream)
                finally:
                    self.pipelines -= 1
            if method == "stage.load":
                async with self._gates.slot(peer_id, "stage.load"):
                    return await self._stage_load(peer_id, frame, stream)
            if method == "stage.unload":
                return self._stage_unload(frame)
            if method == "leaving":  # a peer shutting down cleanly: plan without it now
                self.peers.mark_left(peer_id)
                return F.response_frame(frame.id)
            if method == "peers":
                live = {p.node_id for p in self.peers.live()}
                rows = [self.self_row() | {"live": True}]
                rows += [p.row() | {"live": p.node_id in live} for p in self.peers.all()]
                return F.response_frame(frame.id, peers=rows)
            if method == "status":
                return F.response_frame(frame.id, **self.status())
            if method == "models":
                return F.response_frame(frame.id, models=self.registry.aliases())
            if method == "manifest":
                return self._manifest(frame)
        except (CoordinatorError, StageError, RequestError, ModelNotFound, ValueError) as exc:
            return F.error_frame(ErrorCode.BAD_REQUEST, str(exc), frame.id)
        return F.error_frame(ErrorCode.UNSUPPORTED, f"unknown method {method!r}", frame.id)

    def _note_hello(self, frame: Frame, stream: FrameStream) -> None:
        port, host = frame.header.get("port"), stream.peer_host
        if frame.header.get("role") == "node" and type(port) is int and 0 < port < 65536 and host:
            name = frame.header.get("name")
            peer = self.peers.note(frame.header["node_id"], host, port, "hello",
                                   name[:63] if isinstance(name, str) else "")  # fmt: skip
            self.peers.back(frame.header["node_id"])
            if peer is not None and peer.last_ok is None:  # new: greet it now, not next round
                task = asyncio.get_running_loop().create_task(self.peers.greet(peer))
                self._tasks.append(task)

    async def _generate(self, frame: Frame, stream: FrameStream) -> Frame:
        request = GenerationRequest.from_wire(frame.header.get("request"))
        seq = 0
        timings: dict[str, float] = {}

        async def progress(p: LoadProgress) -> None:  # before any text: no seq of its own
            await stream.send(F.stream_data_frame(frame.id, 0, progress=p.row()))

        chunks = self.requests.watch(
            request.model, "llm", self.generations.generate(request, timings, None, progress),
            timings,
        )  # fmt: skip
        async with contextlib.aclosing(chunks):  # a client gone mid-stream ends it here and now
            async for chunk in chunks:
                if chunk.done:
                    return F.stream_end_frame(
                        frame.id,
                        done_reason=chunk.done_reason,
                        prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=chunk.completion_tokens,
                        **{k: round(v, 6) for k, v in timings.items()},
                    )
                if chunk.tool_calls:  # a call the reply made: its JSON, marked as such
                    payload = json.dumps(calls_json(chunk.tool_calls)).encode("utf-8")
                    data = F.stream_data_frame(frame.id, seq, payload, kind="tool_calls")
                    await stream.send(data)
                    seq += 1
                    continue
                await stream.send(
                    F.stream_data_frame(
                        frame.id, seq, chunk.text.encode("utf-8"), tokens=list(chunk.token_ids)
                    )  # fmt: skip
                )
                seq += 1
        raise CoordinatorError("generation ended without its final chunk")

    async def _stage_load(self, peer_id: str, frame: Frame, stream: FrameStream) -> Frame:
        h = frame.header
        manifest = Manifest.from_json(frame.payload)
        if manifest.model_id != h.get("model"):
            raise StageError("the manifest sent does not hash to the model id named")
        start, end = h.get("start"), h.get("end")
        if type(start) is not int or type(end) is not int:
            raise StageError("start and end must be integers")

        def sources(cid: str) -> list[ShardSource]:  # the asker first: it knows who holds what
            rest = [s for s in self.shard_sources(cid) if s.node_id != peer_id]
            asker = (
                [ShardSource(peer_id, self._connector(peer_id))] if self.peers.get(peer_id) else []
            )
            return asker + rest

        if frame.header.get("progress") is True:  # the asker reads a stream: shard bytes first
            async with _reporting_fetch(stream, frame.id or 0) as progress:
                hosted = await self.host.ensure(manifest, start, end, sources, progress)
        else:
            hosted = await self.host.ensure(manifest, start, end, sources)
        return F.response_frame(
            frame.id, weight_bytes=hosted.weight_bytes, load_s=round(hosted.loaded_s, 3),
            fetched=hosted.fetched,
        )  # fmt: skip

    def _stage_unload(self, frame: Frame) -> Frame:
        h = frame.header
        model, start, end = h.get("model"), h.get("start"), h.get("end")
        if not (isinstance(model, str) and type(start) is int and type(end) is int):
            raise StageError("stage.unload needs model, start and end")
        return F.response_frame(frame.id, unloaded=self.host.unload(model, start, end))

    def _manifest(self, frame: Frame) -> Frame:
        name = frame.header.get("model")
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise ValueError("model must be an alias or model id")
        model_id = self.registry.resolve(name)
        manifest = self.store.get_manifest(model_id)
        return F.response_frame(frame.id, manifest.to_json(), model_id=model_id)

    def status(self) -> dict[str, Any]:
        names = {self.node_id: self.name} | {p.node_id: p.name for p in self.peers.all()}
        plans = []
        for state in self.lifecycle.plans():
            plan = state.plan
            plans.append({
                "model": plan.model_id,
                "aliases": [a for a, m in self.registry.aliases().items() if m == plan.model_id],
                "ready": state.ready,
                "stages": [
                    {"node_id": s.node_id, "name": names.get(s.node_id, ""), "start": s.start,
                     "end": s.end, "weight_bytes": s.weight_bytes,
                     "ms_per_token": self._ms_per_token(s.node_id, plan.model_id, s.start, s.end)}
                    for s in plan.stages
                ],
            })  # fmt: skip
        return {
            "node_id": self.node_id,
            "name": self.name,
            "plans": plans,
            "hosted": [h.row() for h in self.host.stages()],
            "memory_budget": self.memory_budget,
            "memory_used": self.host.used_bytes(),
            **self.memory_fields(),
            "generations": self.generations.running(),  # running or queued here
            "pipelines": self.pipelines,  # sequences passing through stages hosted here
        }

    def _ms_per_token(self, node_id: str, model: str, start: int, end: int) -> float | None:
        """A planned stage's time per decode step, as the node hosting it last said (this
        node's own stages now, a peer's from its last INFO); None where it has not said."""
        if node_id == self.node_id:
            hosted = self.host.get(model, start, end)
            rows = [hosted.row()] if hosted is not None else []
        else:
            peer = self.peers.get(node_id)
            stages = peer.info.get("stages") if peer is not None else None
            rows = stages if isinstance(stages, list) else []
        for row in rows:
            if isinstance(row, dict) and (row.get("model"), row.get("start"),
                                          row.get("end")) == (model, start, end):  # fmt: skip
                ms = row.get("ms_per_token")
                ok = isinstance(ms, int | float) and not isinstance(ms, bool)
                return float(ms) if ok and math.isfinite(ms) and ms >= 0 else None
        return None

    # ---- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        preload_engine()
        # on the stage host's compute thread, as every ggml graph of this process: libgomp keeps
        # a pool of threads per calling thread, and with more of them than CPUs its waits
        # barely spin, which slows every step (before runtime: it counts what it keeps)
        self.speed = await self.host.run(measure_speed, self.config.threads)
        self.host.runtime = resident_bytes()
        if self.host.runtime >= self.memory_budget:  # it can still coordinate and serve
            log.warning(
                "--max-memory %.0f MiB leaves no room for stages: the process holds %.0f MiB "
                "before any", self.memory_budget / 2**20, self.host.runtime / 2**20,
            )  # fmt: skip
        if self.config.api is not None:  # first: a taken port should fail before anything runs
            runner = ApiRunner(self.lifecycle, self.generations)
            service = ApiService(runner, self.registry, self.peers.model_aliases,
                                 self.max_context, self.metrics.render,
                                 ClusterView(self).snapshot, self.requests,
                                 self.host.stages, self.embedder)  # fmt: skip
            self.api = ApiServer(service, self.config.api)
            await self.api.start()
        self.server = await serve(
            self.config.host, self.config.port, self.identity, self.admission, self.handle,
            self.settings,
        )  # fmt: skip
        self.port = self.server.port
        if self.config.mdns:
            from llm_omninode.net.discovery import Advert, Discovery

            advert = Advert(
                self.node_id, self.port, self.admission.fingerprint or "open", self.name
            )
            self.discovery = Discovery(advert, interfaces=self.config.mdns_interfaces)
            await self.discovery.start()
        self._write_state()
        self._tasks.append(asyncio.create_task(self._maintain()))
        log.info(
            "node %s (%s) on %s:%d, %s, speed %s, budget %.0f MiB (runtime %.0f MiB), mDNS %s",
            self.name, self.node_id, self.config.host, self.port, self.device, self.speed,
            self.memory_budget / 2**20, self.host.runtime / 2**20,
            "on" if self.discovery else "off",
        )  # fmt: skip

    async def _maintain(self) -> None:
        while True:
            try:
                self._sync_discovery()
                await self.peers.refresh()
                self.host.evict_idle()
                await self.lifecycle.expire()
            except Exception:  # a maintenance round must never take the node down
                log.exception("maintenance round failed")
            await asyncio.sleep(REFRESH_S)

    def _sync_discovery(self) -> None:
        if self.discovery is None:
            return
        seen = set()
        for record in self.discovery.peers():
            if record.addresses:
                seen.add(record.node_id)
                self.peers.note(record.node_id, record.addresses[0], record.port, "mdns",
                                record.name)  # fmt: skip
        for peer in self.peers.all():
            if peer.source == "mdns" and peer.node_id not in seen:
                self.peers.forget(peer.node_id)

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "node_id": self.node_id, "host": self.advertised_host,
                 "port": self.port, "started": time.time()}  # fmt: skip
        if self.api is not None:
            state["api"] = f"http://{self.api.config.host}:{self.api.port}"
        path = self.config.data_dir / SHIM_STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    async def _say_leaving(self) -> None:
        """Tell the live peers we are going, so their coordinators plan without us at once
        (and replay the sequences we were part of) instead of waiting to find us lost."""

        async def tell(node_id: str) -> None:
            conn = await self.peers.connection(node_id)
            await conn.request(F.request_frame(conn.next_id(), "leaving"), timeout=1.0)

        peers = [p.node_id for p in self.peers.live()]
        await asyncio.gather(*(tell(n) for n in peers), return_exceptions=True)

    async def stop(self) -> None:
        for task in self._tasks:  # first: no greeting of ours may undo the goodbye below
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):  # leaving politely is best effort
            await asyncio.wait_for(self._say_leaving(), 2.0)
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.stop()
        await self.peers.close()
        if self.api is not None:
            await self.api.stop()
        if self.server is not None:
            self.server.close()
        self.host.close()
        with contextlib.suppress(OSError):
            state = self.config.data_dir / SHIM_STATE_FILE
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        log.info("node %s stopped", self.name)


@contextlib.asynccontextmanager
async def _reporting_fetch(stream: FrameStream, request_id: int):
    """A stage load's shard bytes (done, lacking) as STREAM_DATA frames to the asker, at most
    every REPORT_EVERY seconds, while inside; yields the stage host's progress callback."""
    latest: list[tuple[int, int] | None] = [None]
    done = asyncio.Event()

    def note(fetched: int, total: int) -> None:
        latest[0] = (fetched, total)

    async def send() -> None:
        sent = None
        while not done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), REPORT_EVERY)
            if latest[0] is not None and latest[0] != sent:
                sent = latest[0]
                await stream.send(F.stream_data_frame(request_id, 0, fetched=sent[0],
                                                      total=sent[1]))  # fmt: skip

    sender = asyncio.ensure_future(send())
    try:
        yield note
    finally:
        done.set()
        with contextlib.suppress(Exception):  # the asker gone: the load goes on regardless
            await sender
