"""One HTTP POST of a JSON body to a shim's API, for bodies the clients would not send."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


def post(url: str, path: str, body: object) -> tuple[int, dict]:
    """(status, JSON) of one POST to ``url`` + ``path``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()
