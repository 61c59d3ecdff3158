"""The plugin's side of a shim: a QUIC client, asynchronous (``AsyncShimClient``, for
``llm``'s async models) and synchronous (``ShimClient``, the same client on a private event
loop of its own thread).

Which shim: ``OMNI_SHIM=HOST:PORT`` if set; else the local one, found through the
``shim.json`` it writes into the data directory; else one is started in the background
(``python -m omninode_shim``, extra flags from ``OMNI_SHIM_ARGS``), and stderr says so. One
shim owns a data directory (it holds ``shim.lock``): a start that finds one already there
uses it. The client uses this machine's node identity and cluster secret (``llm omni join``),
so a shim admits it like any member, and it talks only to shims of its cluster (or trusted by
id, or holding this very node key: the local shim), unless ``OMNI_OPEN=1`` says that any shim
will do (one started with ``--open``, on a network you trust).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import settings
from .home import SHIM_STATE_FILE, data_dir_locked, omni_home
from .request import GenerationRequest

START_TIMEOUT = 60.0
OPEN_ENV = "OMNI_OPEN"  # "1": talk to any shim, of our cluster or not (one run with --open)
REQUEST_TIMEOUT = 900.0  # the first request may load and fetch stages


class ShimError(RuntimeError):
    """No shim could be reached or started, or it refused the request."""


@dataclass(frozen=True)
class StreamChunk:
    text: str
    done: bool = False
    done_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, float] | None = None  # on the last chunk: prefill_s, decode_s


# while the model loads first: the shim's report (shim/load_progress.py ``LoadProgress.row``:
# status, model, stages, loaded, fetched, total)
ProgressCallback = Callable[[dict[str, Any]], None]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_trust() -> bool:
    """Whether ``OMNI_OPEN`` asks the client to accept shims outside its cluster."""
    return settings.open_trust()


def local_shim(home: Path | None = None) -> tuple[str, int, int] | None:
    """(host, port, pid) of the shim running on this data directory, if any: its shim.json,
    if that pid lives and the data directory's lock is held (a shim killed with -9 leaves
    shim.json behind, and its pid may since be another process's)."""
    home = home or omni_home()
    try:
        state = json.loads((home / SHIM_STATE_FILE).read_text())
        host, port, pid = state["host"], state["port"], state["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (isinstance(host, str) and type(port) is int and type(pid) is int) or not _alive(pid):
        return None
    if data_dir_locked(home) is False:
        return None
    return host, port, pid


def start_local_shim(home: Path | None = None, timeout: float = START_TIMEOUT) -> tuple[str, int]:
    """Start a shim in the background on this data directory; wait until it is serving.

    If its HTTP API cannot have its port (Ollama itself may be listening there), the shim is
    started again without the API: ``llm -m omni/...`` needs only its QUIC side.
    """
    home = home or omni_home()
    home.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "omninode_shim", "--data-dir", str(home)]
    argv += settings.shim_args()
    try:
        return _start(argv, home, timeout)
    except ShimError as exc:
        if "already in use" not in str(exc) or "--no-api" in argv:
            raise
    print("omni: the HTTP API's port is taken; the local shim runs without it", file=sys.stderr)
    return _start([*argv, "--no-api"], home, timeout)


_IN_USE_RE = re.compile(r"data dir .* is in use by ")


def _start(argv: list[str], home: Path, timeout: float) -> tuple[str, int]:
    log_path = home / "shim.log"
    with open(log_path, "ab") as log:
        offset = log.tell()  # what this start writes, not earlier runs
        proc = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
    print(f"omni: started a local shim (pid {proc.pid}, log {log_path})", file=sys.stderr)
    deadline = time.monotonic() + timeout
    other = False  # the data dir turned out to be another shim's: wait for that one
    while time.monotonic() < deadline:
        found = local_shim(home)
        if found is not None and (other or found[2] == proc.pid):
            return found[0], found[1]
        if not other and proc.poll() is not None:
            with open(log_path, "rb") as log:
                log.seek(offset)
                tail = log.read().decode("utf-8", "replace")[-2000:]
            if not _IN_USE_RE.search(tail):
                raise ShimError(f"the shim exited with code {proc.returncode}:\n{tail}")
            # another shim owns this data directory (started meanwhile, or still starting):
            # it is the local shim, once it says where it listens
            other = True
            print(f"omni: {tail.strip().splitlines()[-1]}; using it", file=sys.stderr)
        time.sleep(0.1)
    if other:
        raise ShimError(
            f"the shim that owns {home} did not say where it listens within {timeout:.0f} s"
        )
    raise ShimError(f"the shim did not start within {timeout:.0f} s (see {log_path})")


def shim_address(start: bool = True) -> tuple[str, int]:
    env = settings.shim()
    if env:
        host, sep, port = env.rpartition(":")
        if not sep or not port.isdigit():
            raise ShimError(f"OMNI_SHIM must be HOST:PORT, got {env!r}")
        return host.strip("[]"), int(port)
    found = local_shim()
    if found is not None:
        return found[0], found[1]
    if not start:
        raise ShimError("no shim is running here (start one with `llm omni serve`)")
    return start_local_shim()


_OUR_REFUSAL_RE = re.compile(r"^we refused (\S+): (.*)$", re.DOTALL)


class AsyncShimClient:
    """One connection to a shim, on the caller's event loop."""

    def __init__(self, host: str, port: int, conn: Any) -> None:
        self.host, self.port = host, port
        self._conn = conn

    @classmethod
    async def connect(cls, start: bool = True) -> AsyncShimClient:
        """To the shim ``shim_address`` names (starting one, off the event loop, if asked)."""
        host, port = await asyncio.to_thread(shim_address, start)
        return await cls.open(host, port)

    @classmethod
    async def open(cls, host: str, port: int) -> AsyncShimClient:
        from .net.admission import Admission
        from .net.identity import load_or_create_identity
        from .net.quic import NetError, PeerRefused, connect

        home = omni_home()
        home.mkdir(parents=True, exist_ok=True)
        admission = Admission.from_home(home, open=open_trust())
        try:
            conn = await connect(host, port, load_or_create_identity(home), admission)
        except PeerRefused as exc:
            ours = _OUR_REFUSAL_RE.search(exc.reason)
            if ours is None:
                why = exc.reason.removeprefix("server closed: ")
                raise ShimError(
                    f"the shim at {host}:{port} refused this client: {why} "
                    "(has this machine joined its cluster: llm omni join SECRET?)"
                ) from exc
            node_id, why = ours.groups()
            raise ShimError(
                f"refused the shim at {host}:{port} (node {node_id}): it is not in "
                f"this machine's cluster ({why}). If it runs with --open on a network you "
                f"trust, set {OPEN_ENV}=1 to talk to it anyway; or trust it for good: "
                f"llm omni trust {node_id}"
            ) from exc
        except (NetError, OSError) as exc:
            raise ShimError(
                f"cannot reach the shim at {host}:{port}: {exc} "
                "(is it running? has this machine joined its cluster: llm omni join SECRET?)"
            ) from exc
        return cls(host, port, conn)

    def _who(self) -> str:
        return f"the shim at {self.host}:{self.port} (node {self._conn.peer_id[:16]})"

    async def request(self, method: str, **fields: Any) -> dict[str, Any]:
        from .net import frames as F
        from .net.quic import NetError

        try:
            reply = await self._conn.request(F.request_frame(self._conn.next_id(), method,
                                                             **fields))  # fmt: skip
        except NetError as exc:
            raise ShimError(str(exc)) from exc
        return reply.header

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> AsyncGenerator[StreamChunk, None]:
        """Stream the shim's chunks; the last one has ``done=True``. While the model loads
        first, ``progress`` gets the shim's reports."""
        from .net import frames as F
        from .net.frames import FrameType
        from .net.quic import NetError

        frame = F.request_frame(self._conn.next_id(), "generate", request=request.to_wire())
        try:
            async for reply in self._conn.stream(frame, timeout=REQUEST_TIMEOUT):
                h = reply.header
                if reply.type == FrameType.STREAM_DATA:
                    report = h.get("progress")
                    if isinstance(report, dict):
                        if progress is not None:
                            progress(report)
                        continue
                    yield StreamChunk(reply.payload.decode("utf-8", "replace"))
                elif reply.type == FrameType.STREAM_END:
                    timings = {k: h[k] for k in ("prefill_s", "decode_s") if k in h}
                    yield StreamChunk("", True, h.get("done_reason"), h.get("prompt_tokens", 0),
                                      h.get("completion_tokens", 0), timings)  # fmt: skip
                    return
        except NetError as exc:
            raise ShimError(f"{self._who()}: {exc}") from exc
        raise ShimError(f"{self._who()} ended the stream without finishing")

    async def embed(self, model: str, texts: list[str], truncate: bool = True) -> list[list[float]]:
        """The texts' embeddings, at unit length (the shim's ``embed`` request)."""
        import struct

        from .net import frames as F
        from .net.quic import NetError

        payload = json.dumps(texts).encode("utf-8")
        frame = F.request_frame(self._conn.next_id(), "embed", payload, model=model,
                                truncate=truncate, normalize=True)  # fmt: skip
        try:
            reply = await self._conn.request(frame, timeout=REQUEST_TIMEOUT)
        except NetError as exc:
            raise ShimError(f"{self._who()}: {exc}") from exc
        count, width = reply.header.get("count"), reply.header.get("width")
        if count != len(texts) or type(width) is not int or len(reply.payload) != 4 * count * width:
            raise ShimError(f"{self._who()} answered with malformed embeddings")
        values = struct.unpack(f"<{count * width}f", reply.payload)
        return [list(values[i * width : (i + 1) * width]) for i in range(count)]

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            await asyncio.wait_for(self._conn.close(), 3)

    async def __aenter__(self) -> AsyncShimClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ShimClient:
    """``AsyncShimClient`` driven from a private event loop on its own thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: AsyncShimClient | None = None
        try:
            self._client = self._call(AsyncShimClient.open(host, port))
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, start: bool = True) -> ShimClient:
        return cls(*shim_address(start))

    def _call(self, coro, timeout: float | None = None):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    @property
    def _async(self) -> AsyncShimClient:
        assert self._client is not None, "closed"
        return self._client

    def request(self, method: str, **fields: Any) -> dict[str, Any]:
        return self._call(self._async.request(method, **fields))

    def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> Iterator[StreamChunk]:
        """Stream the shim's chunks; the last one has ``done=True``. ``progress`` (called on
        the client's thread) gets the shim's reports while the model loads first."""
        items: queue.Queue = queue.Queue()

        async def pump():
            chunks = self._async.generate(request, progress)
            try:
                async for chunk in chunks:
                    items.put(chunk)
            except BaseException as exc:
                items.put(exc)
                raise
            finally:
                await chunks.aclose()

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            future.cancel()

    def embed(self, model: str, texts: list[str], truncate: bool = True) -> list[list[float]]:
        """The texts' embeddings, at unit length (the shim's ``embed`` request)."""
        return self._call(self._async.embed(model, texts, truncate))

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):  # closing is best effort
                self._call(client.close(), timeout=4)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=3)

    def __enter__(self) -> ShimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
