"""Raw HTTP POSTs of a JSON body to a shim's API: for bodies the clients would not send, and
for tests that read a response's bytes as sent (every line of a stream, comments included),
which the API clients hide."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


def _send(url: str, path: str, doc: object, timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post(url: str, path: str, body: object, timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON) of one POST to ``url`` + ``path``."""
    status, data = _send(url, path, body, timeout)
    return status, json.loads(data)


def post_lines(url: str, path: str, doc: dict, timeout: float = 120) -> tuple[int, list[bytes]]:
    """POST ``doc`` to ``url + path``: the status and the body's lines."""
    status, data = _send(url, path, doc, timeout)
    return status, data.splitlines()
