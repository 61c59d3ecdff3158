"""The llm plugin driven through llm's own CLI, with private LLM_USER_PATH and OMNI_HOME."""

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from support.tiny_model import write_tiny_llama


@pytest.fixture
def cli(omni_home):
    from llm.cli import cli as llm_cli

    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(llm_cli, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_llama(tmp_path / "tiny.gguf")


HEAVY = ("mlx", "numpy", "tokenizers", "jinja2", "numba", "ggml", "aioquic", "aiohttp")

# in a fresh interpreter: what llm imports by itself (no plugins), then what our hooks add
START_UP = f"""
import json, sys, llm
from llm.cli import cli
llm.get_models()
before = sorted(m for m in {HEAVY!r} if m in sys.modules)
from llm_omninode import plugin
llm.pm.register(plugin, name="llm-omninode")
plugin.register_commands(cli)
names = [m.model_id for m in llm.get_models()]
after = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"before": before, "after": after, "models": names}}))
"""


@pytest.mark.cluster
def test_plugin_start_up_imports_nothing_heavy(omni_home):
    """`llm` imports every plugin at start-up: ours, with a model registered, adds none of
    HEAVY (llm itself imports some of them, numpy for one: those cannot be ours)."""
    omni_home.mkdir(parents=True)
    (omni_home / "aliases.json").write_text(json.dumps({"tiny": "bafkr4i-not-loaded"}))
    env = {**os.environ, "LLM_LOAD_PLUGINS": ""}  # no other plugin's imports either
    done = subprocess.run(
        [sys.executable, "-c", START_UP], capture_output=True, text=True, check=True, env=env
    )
    seen = json.loads(done.stdout)
    assert "omni/tiny" in seen["models"]  # the hooks ran
    assert seen["after"] == seen["before"], seen
    assert {"mlx", "tokenizers", "jinja2"}.isdisjoint(seen["before"])  # so the check means it


def test_add_models_inspect_tokenize(cli, tiny, omni_home):
    out = cli("omni", "add", str(tiny), "--alias", "tiny").output
    assert "added tiny" in out and "bafkr4i" in out
    rows = json.loads(cli("omni", "models", "--json").output)
    assert rows[0]["alias"] == "tiny" and rows[0]["arch"] == "llama"
    assert rows[0]["shards"] == 6 and rows[0]["quant"] == "Q4_1"
    table = cli("omni", "models").output
    assert "ALIAS" in table and "tiny" in table
    shown = cli("omni", "inspect", "tiny").output
    assert "block.3" in shown and "refs token_embd.weight" in shown
    ids = json.loads(cli("omni", "tokenize", "-m", "tiny", "--special", "<|im_start|>the").output)
    assert ids[0] == 1
    plain = json.loads(cli("omni", "tokenize", "-m", "tiny", "<|im_start|>").output)
    assert 1 not in plain
    assert "omni/tiny" in cli("models").output


@pytest.mark.cluster
def test_generate_stream_and_no_stream_agree(cli, tiny, omni_home):
    """The first prompt starts a local shim in the background (and says so on stderr)."""
    cli("omni", "add", str(tiny), "--alias", "tiny")
    args = ["-m", "omni/tiny", "hello", "-o", "temperature", "0", "-o", "max_tokens", "8"]
    first = cli("prompt", *args)
    assert "started a local shim" in first.stderr
    assert json.loads((omni_home / "shim.json").read_text())["port"] > 0
    streamed = first.stdout
    whole = cli("prompt", *args, "--no-stream").stdout
    assert streamed == whole and streamed.strip()
    logged = json.loads(cli("logs", "--json", "-n", "1").output)[0]
    assert logged["input_tokens"] > 0 and 0 < logged["output_tokens"] <= 8


@pytest.mark.cluster
def test_auto_started_shim_goes_without_the_api_when_its_port_is_taken(
    cli, tiny, omni_home, monkeypatch
):
    """Ollama may hold the API's port: ``llm -m omni/...`` still works, and says why."""
    cli("omni", "add", str(tiny), "--alias", "tiny")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = f"--host 127.0.0.1 --port 0 --no-mdns --max-memory 1GiB --api-port {port}"
        monkeypatch.setenv("OMNI_SHIM_ARGS", args)
        out = cli("prompt", "-m", "omni/tiny", "hi", "-o", "max_tokens", "4")
    assert "port is taken" in out.stderr and out.stdout.strip()
    assert "api" not in json.loads((omni_home / "shim.json").read_text())


@pytest.mark.cluster
def test_seed_repeats_and_conversation_continues(cli, tiny):
    cli("omni", "add", str(tiny), "--alias", "tiny")
    args = ["-m", "omni/tiny", "hi", "-o", "seed", "7", "-o", "max_tokens", "6"]
    assert cli(*args).stdout == cli(*args).stdout
    cli("-c", "and then?", "-o", "max_tokens", "4", "-s", "be brief")
    logged = json.loads(cli("logs", "--json", "-n", "1").output)[0]
    # the second turn's prompt carries the first exchange
    assert logged["input_tokens"] > 10


def test_bad_inputs_give_clear_errors(cli, tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    result = cli("omni", "add", str(bad), ok=False)
    assert result.exit_code == 1 and "Error" in result.output and "byte" in result.output
    cli("omni", "add", str(tiny), "--alias", "tiny")
    result = cli("-m", "omni/tiny", "x", "-o", "top_p", "7", ok=False)
    assert result.exit_code != 0 and "top_p" in result.output
    result = cli("-m", "omni/tiny", "x", "-o", "stop", "[1, 2]", ok=False)
    assert result.exit_code != 0
    result = cli("omni", "inspect", "nope", ok=False)
    assert "no model named" in result.output
