"""A Hugging Face hub on loopback, for ``huggingface_hub`` to list and download from offline.

It answers the requests ``huggingface_hub`` really makes for ``model_info(files_metadata=True)``
and ``hf_hub_download``: ``GET /api/models/USER/REPO[/revision/REV]?blobs=true`` (the files
with their LFS sha256 and size, and the commit), ``HEAD`` and ``GET
/USER/REPO/resolve/REV/PATH`` (ETag, X-Repo-Commit, Content-Length, Accept-Ranges; a Range
request answered 206 with Content-Range). Point ``HF_ENDPOINT`` at ``hub.url``.

A file can be listed with a sha256 its bytes do not have (``listed_sha256``), its first
download cut halfway (``drop_once``: the connection closes after half the bytes promised) or
refused (``fail_once``: 500), or held until the test lets it go (``hold``, an Event).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit


@dataclass
class HubFile:
    data: bytes
    sha256: str
    drop_once: bool = False
    fail_once: bool = False
    hold: threading.Event | None = None  # a download's bytes wait for it


@dataclass
class LocalHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, range)
    url: str = ""

    def add(
        self,
        repo: str,
        path: str,
        data: bytes,
        *,
        listed_sha256: str | None = None,
        drop_once: bool = False,
        fail_once: bool = False,
        hold: threading.Event | None = None,
    ) -> None:
        sha = listed_sha256 or hashlib.sha256(data).hexdigest()
        self.repos.setdefault(repo, {})[path] = HubFile(data, sha, drop_once, fail_once, hold)

    def commit(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def gets(self, suffix: str = "") -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith(suffix)]

    def __enter__(self) -> LocalHub:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.answer(body=True)

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def answer(self, body: bool) -> None:
                path = urlsplit(self.path).path
                hub.requests.append((self.command, path, self.headers.get("Range", "")))
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if api:
                    return self.listing(api[1])
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if resolve and resolve[1] in hub.repos:
                    file = hub.repos[resolve[1]].get(unquote(resolve[3]))
                    if file is not None:
                        return self.file(resolve[1], file, body)
                self.send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})

            def listing(self, repo: str) -> None:
                if repo not in hub.repos:
                    headers = {"X-Error-Code": "RepoNotFound"}
                    return self.send(404, b'{"error": "Repository not found"}', headers)
                siblings = [
                    {"rfilename": p, "size": len(f.data), "blobId": "0" * 40,
                     "lfs": {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}}
                    for p, f in hub.repos[repo].items()
                ]  # fmt: skip
                doc = {"id": repo, "modelId": repo, "sha": hub.commit(repo), "siblings": siblings}
                self.send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

            def file(self, repo: str, file: HubFile, body: bool) -> None:
                data, start = file.data, 0
                headers = {"ETag": f'"{file.sha256}"', "X-Repo-Commit": hub.commit(repo),
                           "Accept-Ranges": "bytes"}  # fmt: skip
                status = 200
                want = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if want and body:
                    start = int(want[1])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if body and file.hold is not None:
                    file.hold.wait(60)
                if body and file.fail_once:
                    file.fail_once = False
                    return self.send(500, b'{"error": "try again"}', {})
                if body and file.drop_once and not start:
                    file.drop_once = False  # promise all the bytes, send half, hang up
                    self.send_response(200)
                    for k, v in {**headers, "Content-Length": str(len(data))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send(status, data[start:], headers, body=body)

            def send(self, status: int, data: bytes, headers: dict, body: bool = True) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body and self.command != "HEAD":
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
