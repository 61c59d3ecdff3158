"""A raw HTTP POST of a JSON body, for tests that read a response's bytes as sent (every line
of a stream, comments included), which the API clients hide."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


def post_lines(url: str, path: str, doc: dict, timeout: float = 120) -> tuple[int, list[bytes]]:
    """POST ``doc`` to ``url + path``: the status and the body's lines."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().splitlines()
    finally:
        conn.close()
