"""The llm plugin driven through llm's own CLI, with private LLM_USER_PATH and OMNI_HOME."""

import json
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from tiny_model import write_tiny_llama


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


@pytest.mark.cluster
def test_plugin_start_up_imports_nothing_heavy():
    code = (
        "import sys, llm; llm.get_plugins(); from llm_omninode import plugin; "
        "print(sorted(m for m in ('mlx', 'numpy', 'tokenizers', 'jinja2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mlx" not in out.stdout and "tokenizers" not in out.stdout, out.stdout


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
