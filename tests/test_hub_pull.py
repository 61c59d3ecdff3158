"""Pull by name from the Hugging Face hub (``hf.co/USER/REPO[:QUANT]``), offline: a hub in the
hub's layout on loopback (support.local_hub) serves tiny GGUFs, and ``HF_ENDPOINT`` points
``huggingface_hub`` at it. Names, the file a tag picks, split GGUFs joined, sha256 checks, a
dropped download resumed, the cache; the CLI and ``/api/pull`` through real processes."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import ollama
import pytest
from support.local_hub import LocalHub
from support.shim_cluster import LLM, ShimCluster
from support.tiny_model import split_gguf, write_tiny_llama

from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.gguf_split import join_split, split_name
from llm_omninode.backend.hub import HubError, HubFile, choose_file, parse_hub_name, quant_of
from llm_omninode.backend.library import PullWatch, named_pull
from llm_omninode.backend.registry import ModelRegistry, check_alias

SINGLE = "omni/tiny-GGUF"
SPLIT = "omni/split-GGUF"
BAD = "omni/bad-GGUF"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("models")
    q4 = write_tiny_llama(d / "tiny-Q4_K_M.gguf").read_bytes()
    q8 = write_tiny_llama(d / "tiny-Q8_0.gguf", seed=1).read_bytes()
    whole = write_tiny_llama(d / "big-Q4_K_M.gguf", seed=2)
    parts = [p.read_bytes() for p in split_gguf(whole, 2)]
    return {"q4": q4, "q8": q8, "whole": whole.read_bytes(), "part1": parts[0], "part2": parts[1]}


@pytest.fixture
def hub(models):
    with LocalHub() as h:
        h.add(SINGLE, "tiny-Q4_K_M.gguf", models["q4"])
        h.add(SINGLE, "tiny-Q8_0.gguf", models["q8"])
        h.add(SINGLE, "mmproj-tiny-F16.gguf", b"not a model")
        h.add(SINGLE, "README.md", b"# tiny")
        h.add(SPLIT, "Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", models["part1"])
        h.add(SPLIT, "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf", models["part2"], drop_once=True)
        h.add(BAD, "bad-Q4_K_M.gguf", models["q4"], listed_sha256="0" * 64)
        yield h


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return hub


def pull(registry: ModelRegistry, name: str):
    seen: list = []
    phases: list = []
    watch = PullWatch(progress=lambda d, t: seen.append((d, t)), phase=phases.append)
    record = named_pull(name).run(registry, watch)
    return record, seen, phases


# ---- names and choices (pure) ----------------------------------------------------------------
def test_hub_names():
    n = parse_hub_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:q4_k_m")
    assert n and n.repo_id == "bartowski/Llama-3.2-1B-Instruct-GGUF" and n.tag == "q4_k_m"
    assert parse_hub_name("omni/huggingface.co/a/b").typed() == "huggingface.co/a/b:latest"
    assert parse_hub_name("HF.CO/a/b:latest").tag is None
    assert parse_hub_name("smollm2") is None and parse_hub_name("omni/smollm2:latest") is None
    for bad in ("hf.co/a", "hf.co/a/b/c", "hf.co/../b", "hf.co/a/..", "hf.co/a/.b", "hf.co/a/b:",
                "hf.co/a/b:x/y", "hf.co/a/b:../x", "hf.co//b", "hf.co/a/b c"):  # fmt: skip
        if bad.endswith(":"):
            assert parse_hub_name(bad).tag is None  # an empty tag is no tag
            continue
        with pytest.raises(HubError) as info:
            parse_hub_name(bad)
        assert info.value.status == 400, bad
    # aliases may hold '/' and ':'; never a segment that climbs or an absolute path
    assert check_alias("hf.co/a/b:Q4_K_M") == "hf.co/a/b:Q4_K_M"
    for bad in ("/etc/x", "a//b", "a/../b", "a/./b", "a/", "../a", "a/.hidden", "x" * 201):
        with pytest.raises(ValueError):
            check_alias(bad)


def test_choosing_the_file():
    def files(*paths):
        return [HubFile(p, "a" * 64, 10) for p in paths]

    name = parse_hub_name
    repo = files("m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-IQ4_XS.gguf", "mmproj-m-Q4_K_M.gguf", "x.md")
    assert choose_file(name("hf.co/u/r"), repo)[:2] == ("Q4_K_M", "m-Q4_K_M.gguf")
    assert choose_file(name("hf.co/u/r:q8_0"), repo)[:2] == ("Q8_0", "m-Q8_0.gguf")
    assert choose_file(name("hf.co/u/r:iq4_xs"), repo)[0] == "IQ4_XS"
    with pytest.raises(HubError, match=r"no Q5_K_S GGUF; it has: IQ4_XS \(m-IQ4_XS.gguf\), "):
        choose_file(name("hf.co/u/r:Q5_K_S"), repo)
    with pytest.raises(HubError, match="none is Q4_K_M; it has: .*Q8_0"):
        choose_file(name("hf.co/u/r"), files("m-Q8_0.gguf", "m-F16.gguf"))
    assert choose_file(name("hf.co/u/r"), files("only.gguf"))[:2] == ("only", "only.gguf")
    with pytest.raises(HubError, match="has no GGUF"):
        choose_file(name("hf.co/u/r"), files("model.safetensors"))
    split = files("Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf")
    quant, joined, parts = choose_file(name("hf.co/u/r:Q4_K_M"), split)
    assert (quant, joined) == ("Q4_K_M", "Q4_K_M/m-Q4_K_M.gguf")
    assert [p.path[-19:] for p in parts] == ["00001-of-00002.gguf", "00002-of-00002.gguf"]
    with pytest.raises(HubError, match=r"lacks part\(s\) \[2\]"):
        choose_file(name("hf.co/u/r"), split[1:])
    assert quant_of("a/b-bf16-00001-of-00003.gguf") == "BF16"
    assert split_name("m-00003-of-00002.gguf") is None


def test_join_of_a_split_gguf(tmp_path):
    whole = write_tiny_llama(tmp_path / "m.gguf", seed=3)
    parts = split_gguf(whole, 3)
    assert [split_name(p.name)[1:] for p in parts] == [(1, 3), (2, 3), (3, 3)]
    joined = join_split(parts, tmp_path / "out" / "m.gguf")
    with open_gguf(whole) as a, open_gguf(joined) as b:
        assert a.metadata == b.metadata and list(a.tensors) == list(b.tensors)
        assert all((a.tensor_data(n) == b.tensor_data(n)).all() for n in a.tensors)
        n_tensors = len(a.tensors)
    # an independent reader (the gguf package, llama.cpp's own Python) reads it as one file
    import gguf

    reader = gguf.GGUFReader(joined)
    assert len(reader.tensors) == n_tensors
    assert not [k for k in reader.fields if k.startswith("split.")]
    # gguf-split --no-tensor-first-split: a first part of metadata alone
    (tmp_path / "b").mkdir()
    bare = split_gguf(write_tiny_llama(tmp_path / "b" / "m.gguf", seed=3), 3,
                      no_tensor_first_split=True)  # fmt: skip
    with open_gguf(bare[0]) as first:
        assert first.tensors == {}
    again = join_split(bare, tmp_path / "b" / "out.gguf")
    assert again.read_bytes() == joined.read_bytes()
    with pytest.raises(ValueError, match="split.no"):
        join_split([parts[1], parts[0], parts[2]], tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match="split.count"):
        join_split(parts[:2], tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_the_bar_counts_a_xet_download_once():
    """Xet-stored files (most of the hub's now) report network bytes and bytes written through
    huggingface_hub's XetDownloadProgressReporter; the pull's bar counts the bytes written."""
    from types import SimpleNamespace

    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    from llm_omninode.backend.hub import _counting_bar

    seen: list[int] = []
    with XetDownloadProgressReporter(
        reconstruction_desc="f: reconstructing file", total=100, log_level=30,
        tqdm_class=_counting_bar(seen.append),
    ) as reporter:  # fmt: skip
        for written, received in ((10, 40), (60, 70), (100, 80)):
            reporter.update_progress(SimpleNamespace(
                total_bytes_completed=written, total_transfer_bytes_completed=received,
                total_bytes=100, total_bytes_completion_rate=None,
                total_transfer_bytes_completion_rate=None,
            ))  # fmt: skip
        reporter.close()
    assert seen == [10, 50, 40]


def test_the_progress_feed_is_bounded():
    """/api/pull's feed: the pull's thread posts at most once a percent, and an unread stream
    holds its statuses in order and the newest progress object only."""
    import asyncio

    from omninode_shim.http.pull import Feed

    from llm_omninode.backend.library import PullStart

    posts: list[dict] = []

    async def main() -> list[list[dict]]:
        feed = Feed(asyncio.get_running_loop())
        post = feed.post
        feed.post = lambda doc, **kw: (posts.append(doc), post(doc, **kw))  # type: ignore
        watch = feed.watch()

        def pull() -> None:
            watch.phase("pulling manifest")
            watch.started(PullStart("t", "f.gguf", "sha256:" + "ab" * 32, 10**6, 1))
            for done in range(0, 10**6 + 1, 10):  # a hundred thousand updates
                watch.progress(done, 10**6)
            watch.phase("verifying sha256 digest")

        await asyncio.to_thread(pull)
        await asyncio.sleep(0)
        return [feed.take(), feed.take()]

    first, second = asyncio.run(main())
    assert [d["status"] for d in first] == ["pulling manifest", "pulling abababababab",
                                            "verifying sha256 digest"]  # fmt: skip
    assert first[1]["completed"] == first[1]["total"] == 10**6 and second == []
    assert len(posts) == 2 + 101  # two statuses, and a progress object a percent


# ---- pulls, in process, from the loopback hub --------------------------------------------------
def test_pull_one_file_then_from_cache(hub_env, tmp_path, models):
    registry = ModelRegistry(tmp_path / "home")
    record, seen, phases = pull(registry, f"hf.co/{SINGLE}")
    assert record.alias == f"hf.co/{SINGLE}:Q4_K_M"
    assert registry.resolve(f"hf.co/{SINGLE}") == record.model_id  # as asked: ":latest"
    path = Path(registry.store.file_source(record.model_id).path)
    assert path.read_bytes() == models["q4"] and path.name == "tiny-Q4_K_M.gguf"
    assert {t for _, t in seen} == {len(models["q4"])} and seen[-1][0] == len(models["q4"])
    assert phases == ["pulling manifest", "verifying sha256 digest", "writing manifest"]
    # again: listed once more, the file is not downloaded again (but checked again)
    before = len(hub_env.gets(".gguf"))
    again, _, _ = pull(registry, f"huggingface.co/{SINGLE}:q4_k_m")
    assert again.model_id == record.model_id and len(hub_env.gets(".gguf")) == before
    assert registry.resolve(f"huggingface.co/{SINGLE}:q4_k_m") == record.model_id


def test_pull_split_joins_and_resumes(hub_env, tmp_path, models, monkeypatch):
    """Part 2's first download is cut halfway: huggingface_hub resumes it with a Range from
    the bytes it kept (its chunks made small here, so that the cut falls after some)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    registry = ModelRegistry(tmp_path / "home")
    record, seen, _ = pull(registry, f"hf.co/{SPLIT}:Q4_K_M")
    assert record.alias == f"hf.co/{SPLIT}:Q4_K_M"
    path = Path(registry.store.file_source(record.model_id).path)
    with open_gguf(path) as joined:
        assert "split.count" not in joined.metadata and len(joined.tensors) > 4
    assert hashlib.sha256(path.read_bytes()).digest() != b""  # readable as one file
    ranges = [r for _, p, r in hub_env.gets("00002-of-00002.gguf")]
    half = len(models["part2"]) // 2
    assert ranges[0] == "" and ranges[1] == f"bytes={half // 4096 * 4096}-" and half > 4096
    total = len(models["part1"]) + len(models["part2"])
    assert {t for _, t in seen} == {total} and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # one bar, never back
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == [
        "big-Q4_K_M.gguf",
        "big-Q4_K_M.gguf.parts.json",
    ]  # fmt: skip  (the parts are gone)
    gets = len(hub_env.gets())
    assert pull(registry, f"hf.co/{SPLIT}")[0].model_id == record.model_id
    assert len(hub_env.gets()) == gets + 1  # the listing only


def test_a_failed_pull_is_taken_up_where_it_stopped(hub_env, tmp_path, models):
    """A pull that fails on its second part keeps the first: the next pull fetches only the
    second (and checks both)."""
    hub_env.add(SPLIT, "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf", models["part2"], fail_once=True)
    registry = ModelRegistry(tmp_path / "home")
    with pytest.raises(HubError, match="could not be downloaded") as info:
        pull(registry, f"hf.co/{SPLIT}")
    assert info.value.status == 502 and registry.records() == []
    first = len(hub_env.gets("00001-of-00002.gguf"))
    record, _, _ = pull(registry, f"hf.co/{SPLIT}")
    assert record.alias == f"hf.co/{SPLIT}:Q4_K_M"
    assert len(hub_env.gets("00001-of-00002.gguf")) == first == 1


def test_a_full_disk_while_joining_keeps_the_parts(hub_env, tmp_path, models):
    """No room to join: a named error (507 through the API), the partly joined file gone, the
    verified parts kept; with room again, the next pull joins them without downloading."""
    from test_named_errors import tmpfs

    from llm_omninode.backend.store import StorageFull

    parts = len(models["part1"]) + len(models["part2"])
    with tmpfs(tmp_path / "disk", parts + 64 * 1024) as disk:
        registry = ModelRegistry(disk / "home")
        with pytest.raises(StorageFull, match="the downloaded parts are kept"):
            pull(registry, f"hf.co/{SPLIT}")
        kept = sorted(p.name for p in (disk / "home").rglob("*.gguf"))
        assert kept == ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
        subprocess.run(["mount", "-o", "remount,size=4M", str(disk)], check=True)
        gets = len(hub_env.gets(".gguf"))
        record, _, _ = pull(registry, f"hf.co/{SPLIT}")
        assert record.alias == f"hf.co/{SPLIT}:Q4_K_M" and len(hub_env.gets(".gguf")) == gets


def test_pull_refuses_bytes_that_do_not_match(hub_env, tmp_path):
    registry = ModelRegistry(tmp_path / "home")
    with pytest.raises(HubError, match="does not match the hub's 0000"):
        pull(registry, f"hf.co/{BAD}")
    assert registry.records() == [] and registry.aliases() == {}
    left = [p for p in (tmp_path / "home" / "files").rglob("*") if p.is_file()]
    assert not [p for p in left if p.suffix == ".gguf"], left
    with pytest.raises(HubError, match="no such repository") as info:
        pull(registry, "hf.co/omni/nothing-here")
    assert info.value.status == 404
    with pytest.raises(HubError, match="no Q2_K GGUF; it has: Q4_K_M") as info:
        pull(registry, f"hf.co/{SINGLE}:Q2_K")
    assert info.value.status == 404


def test_cli_pull_in_process(hub_env, omni_home):
    """`llm omni pull` (click's runner): a refusal is a clean error; the name in the listing."""
    from click.testing import CliRunner
    from llm.cli import cli as llm_cli

    bad = CliRunner().invoke(llm_cli, ["omni", "pull", f"hf.co/{BAD}"])
    assert bad.exit_code == 1 and "does not match the hub's" in bad.output
    wrong = CliRunner().invoke(llm_cli, ["omni", "pull", f"hf.co/{SINGLE}:Q2_K"])
    assert wrong.exit_code == 1 and "it has: Q4_K_M (tiny-Q4_K_M.gguf), Q8_0" in wrong.output
    done = CliRunner().invoke(llm_cli, ["omni", "pull", f"hf.co/{SINGLE}:Q8_0", "--alias", "t8"])
    assert done.exit_code == 0, done.output
    listed = json.loads(CliRunner().invoke(llm_cli, ["omni", "models", "--json"]).output)
    assert [r["alias"] for r in listed] == [f"hf.co/{SINGLE}:Q8_0"]  # one row, a name of it
    registry = ModelRegistry(omni_home)
    assert {registry.resolve(n) for n in ("t8", f"hf.co/{SINGLE}:Q8_0")} == {listed[0]["id"]}


# ---- through real processes: `llm omni pull`, `llm -m`, a shim's /api/pull -------------------
@pytest.mark.cluster
def test_pull_through_the_cli_and_the_api(hub, tmp_path, models):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    with ShimCluster(tmp_path / "c", 1, extra_env=env) as cluster:
        cluster.start_all()
        # `llm omni pull` into the shim's home: one bar (not a TTY: its label once), the parts
        # joined, then the model answers through `llm -m omni/...`
        done = cluster.run([*LLM, "omni", "pull", f"hf.co/{SPLIT}"], timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stderr.splitlines()
        assert lines[0].startswith(f"pulling hf.co/{SPLIT}:Q4_K_M: Q4_K_M/big-Q4_K_M.gguf, 2 parts")
        assert lines[1] == "big-Q4_K_M.gguf" and lines[2].startswith("verified sha256 of 2 files")
        assert f"added hf.co/{SPLIT}:Q4_K_M" in done.stdout
        # (a failed prompt fails here; a tiny model's 3 tokens may all be whitespace)
        cluster.llm("-m", f"omni/hf.co/{SPLIT}:Q4_K_M", "hi", "-o", "max_tokens", "3")
        url = cluster.api_url(0)
        # raw HTTP, streamed: Ollama's statuses, one progress digest, then success
        lines = _post_lines(url, {"model": f"hf.co/{SINGLE}:q4_k_m", "insecure": False})
        statuses = [d.get("status") for d in lines]
        assert statuses[0] == "pulling manifest" and statuses[-3:] == [
            "verifying sha256 digest", "writing manifest", "success"
        ], lines  # fmt: skip
        progress = [d for d in lines if "completed" in d]
        assert progress and {d["digest"] for d in progress} == {progress[0]["digest"]}
        assert progress[-1]["completed"] == progress[-1]["total"] and len(progress) <= 102
        assert progress[0]["status"] == f"pulling {progress[0]['digest'][7:19]}"
        # the ollama client, streamed and not
        client = ollama.Client(host=url)
        # a pull runs off the shim's event loop: while its download is held, the API answers
        hold = threading.Event()
        hub.add("omni/slow-GGUF", "slow-Q4_K_M.gguf", models["q8"], hold=hold)
        slow: list = []
        puller = threading.Thread(target=lambda: slow.extend(
            _post_lines(url, {"name": "hf.co/omni/slow-GGUF"})))  # fmt: skip
        puller.start()
        while not hub.gets("slow-Q4_K_M.gguf"):
            time.sleep(0.05)
        meanwhile = ollama.Client(host=url, timeout=10)  # a blocked loop would time it out
        assert meanwhile.list().models and meanwhile.ps() is not None
        hold.set()
        puller.join(60)
        assert slow[-1] == {"status": "success"}
        events = list(client.pull(f"hf.co/{SINGLE}:Q8_0", stream=True))
        assert events[0].status == "pulling manifest" and events[-1].status == "success"
        assert any(e.total and e.completed == e.total for e in events)
        with pytest.raises(ollama.ResponseError, match="does not match the hub's"):
            list(client.pull(f"hf.co/{BAD}", stream=True))
        with pytest.raises(ollama.ResponseError) as info:
            client.pull(f"hf.co/{SINGLE}:Q2_K")  # not streamed: a status and {"error"}
        assert info.value.status_code == 404 and "it has: Q4_K_M" in info.value.error
        with pytest.raises(ollama.ResponseError) as info:
            client.pull("hf.co/../etc")
        assert info.value.status_code == 400
        names = {m.model for m in client.list().models}
        assert {f"hf.co/{SINGLE}:Q8_0", f"hf.co/{SPLIT}:Q4_K_M"} <= names, names
        # a pulled model answers by the name it was pulled as (nonsense, but tokens)
        answer = client.generate(model=f"hf.co/{SINGLE}:Q8_0", prompt="hi",
                                 options={"num_predict": 3, "temperature": 0})  # fmt: skip
        assert answer.done and answer.eval_count == 3


def _post_lines(url: str, doc: dict) -> list[dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", "/api/pull", body=json.dumps(doc).encode())
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("application/x-ndjson")
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]
    finally:
        conn.close()
