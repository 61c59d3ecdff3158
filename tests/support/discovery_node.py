"""One Discovery node for tests/test_discovery.py, meant to run inside a test namespace.

Prints JSON lines on stdout: {"event": "started"} once registered, {"event": "peers", ...}
with the whole table at start and on every change, {"event": "stopped"} after a clean stop
(SIGTERM or SIGINT). Discovery's log goes to stderr at DEBUG (the test reads ignored peers
there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time

from llm_omninode.net.discovery import Advert, Discovery


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True, help="IP address to bind mDNS to")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--fp", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttl", type=int, default=20)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(message)s")
    logging.getLogger("llm_omninode.net.discovery").setLevel(logging.DEBUG)

    discovery: Discovery

    def show() -> None:
        peers = [
            {
                "node_id": p.node_id,
                "name": p.name,
                "addresses": list(p.addresses),
                "port": p.port,
                "fingerprint": p.fingerprint,
            }
            for p in discovery.peers()
        ]
        emit("peers", peers=peers)

    advert = Advert(node_id=args.node_id, port=args.port, fingerprint=args.fp, name=args.name)
    discovery = Discovery(advert, interfaces=[args.addr], ttl=args.ttl, on_change=show)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await discovery.start()
    emit("started", node_id=args.node_id)
    show()
    await done.wait()
    await discovery.stop()
    emit("stopped")


if __name__ == "__main__":
    asyncio.run(main())
