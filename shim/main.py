"""``omni-shim``: run one OmniNode node until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path

import click

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


STOP_WITHIN = 4.0  # seconds from SIGTERM to exit, whatever the node is doing


def parse_size(text: str) -> int:
    """``512M``, ``1.5GiB``, ``2G`` ... -> bytes (k/M/G decimal, Ki/Mi/Gi binary)."""
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").lower().removesuffix("b") if m else None
    if m is None or unit not in _UNITS:
        raise click.BadParameter(f"not a size: {text!r} (try 512MiB or 4G)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise click.BadParameter("size must be positive")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir", type=click.Path(path_type=Path), help="State and shards (default: OMNI_HOME)."
)
@click.option("--host", default="0.0.0.0", show_default=True, help="UDP address to listen on.")
@click.option("--port", type=int, default=None, help="UDP port (default 7341; 0: any free port).")
@click.option("--join", "join", metavar="SECRET", help="Join the cluster with this secret.")
@click.option("--open", "open_", is_flag=True, help="Admit every node (only on a LAN you trust).")
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="A peer to reach without mDNS (repeatable).")  # fmt: skip
@click.option(
    "--max-memory", metavar="SIZE", help="Memory for weights + KV (default: half of RAM)."
)
@click.option("--max-context", type=int, help="Longest sequence (default: the model's).")
@click.option("--name", default="", help="A name for this node (default: the host name).")
@click.option("--no-mdns", is_flag=True, help="No mDNS discovery (use --peer).")
@click.option("--mdns-interface", "mdns_interfaces", multiple=True, metavar="ADDR",
              help="Run mDNS on this local address only (repeatable; default: all).")  # fmt: skip
@click.option("--advertise-host", help="The address peers should use to reach this node.")
@click.option(
    "--api-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the HTTP API (Ollama, OpenAI); loopback unless told otherwise.",
)
@click.option(
    "--api-port",
    type=int,
    default=11434,
    show_default=True,
    help="Port of the HTTP API (0: any free port).",
)
@click.option(
    "--api-token",
    envvar="OMNI_API_TOKEN",
    metavar="TOKEN",
    help="Require 'Authorization: Bearer TOKEN' on the HTTP API (env OMNI_API_TOKEN).",
)
@click.option("--no-api", is_flag=True, help="No HTTP API.")
@click.option(
    "--parallel",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Sequences of one model coordinated here at once; more wait in a queue.",
)
@click.option(
    "--no-prefix-cache",
    is_flag=True,
    help="Do not keep finished sequences' KV caches for a chat's next turn.",
)
@click.option(
    "--threads",
    type=click.IntRange(0, 1024),
    default=0,
    show_default=True,
    help="CPU threads of a stage's compute (0: OMNI_GGML_THREADS, else all cores). Give each "
    "of several nodes on one machine its share: threads that wait for a core stall the others.",
)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))  # fmt: skip
def main(data_dir, host, port, join, open_, peers, max_memory, max_context, name, no_mdns,
         mdns_interfaces, advertise_host, api_host, api_port, api_token, no_api, parallel,
         no_prefix_cache, threads, log_level) -> None:  # fmt: skip
    """Run an OmniNode node: it discovers its peers, holds a slice of each model's blocks and
    coordinates the requests that reach it."""
    from llm_omninode.home import DataDirInUse, lock_data_dir, omni_home

    from .http.server import ApiConfig
    from .node import DEFAULT_PORT, Node, NodeConfig

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("quic", "aioquic", "zeroconf"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    data_dir = data_dir or omni_home()
    try:  # one shim per data dir (one node id, one store): before any socket or file of it
        lock_data_dir(data_dir)
    except DataDirInUse as exc:
        _exit(str(exc))
    except OSError as exc:
        _exit(f"cannot lock data dir {data_dir}: {exc}")
    try:  # a taken port is said now, before a new data dir gets its key and secret
        _try_udp(host, DEFAULT_PORT if port is None else port)
    except UdpBindError as exc:
        _exit(str(exc))
    config = NodeConfig(
        data_dir=data_dir,
        host=host,
        port=DEFAULT_PORT if port is None else port,
        join=join,
        open=open_,
        peers=list(peers),
        max_memory=parse_size(max_memory) if max_memory else None,
        name=name,
        mdns=not no_mdns,
        mdns_interfaces=list(mdns_interfaces) or None,
        max_context=max_context,
        advertise_host=advertise_host,
        api=None if no_api else ApiConfig(api_host, api_port, api_token or None),
        parallel=parallel,
        prefix_reuse=not no_prefix_cache,
        threads=threads or None,
    )
    try:
        asyncio.run(_run(Node, config))
    except (OSError, ValueError) as exc:
        _exit(str(exc))


def _exit(message: str) -> None:
    """One clear line on stderr, exit status 1 (no traceback)."""
    click.echo(f"omni-shim: {message}", err=True)
    sys.exit(1)


class UdpBindError(OSError):
    """The node's QUIC (UDP) address cannot be had."""


def _udp_bind_error(exc: OSError, host: str, port: int) -> UdpBindError:
    if exc.errno == errno.EADDRINUSE:
        return UdpBindError(f"UDP port {port} on {host} is in use (another omni-shim? pick --port)")
    return UdpBindError(f"cannot listen on UDP {host}:{port}: {exc.strerror or exc}")


def _try_udp(host: str, port: int) -> None:
    """UdpBindError if ``host:port`` cannot be bound now (the node binds it again later)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        raise _udp_bind_error(exc, host, port) from exc


def _dump_tasks() -> None:
    """Log the stack of every asyncio task (``kill -USR1 PID``): for a node that seems stuck."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=12, file=out)
    logging.getLogger("omninode_shim").warning("asyncio tasks:\n%s", out.getvalue())


async def _run(node_cls, config) -> None:
    from .http.server import ApiStartError

    node = node_cls(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)  # what is everyone waiting on?
    try:
        try:
            await node.start()
        except OSError as exc:
            # the API (started first) says itself what went wrong; another OSError before the
            # QUIC server exists is its UDP socket's bind
            if node.server is None and not isinstance(exc, ApiStartError):
                raise _udp_bind_error(exc, config.host, config.port) from exc
            raise
        await stop.wait()
    finally:
        # a node stops within STOP_WITHIN whatever it is doing: what is left (a stage mid
        # prompt on the worker thread, a peer that does not answer) is cut off by the exit
        try:
            await asyncio.wait_for(node.stop(), STOP_WITHIN)
        except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - exiting anyway
            logging.getLogger("omninode_shim").warning("stop cut short: %r", exc)
        if stop.is_set():  # asked to stop: no worker thread may hold the exit up either
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


if __name__ == "__main__":
    main()
