"""Shared fixtures: the real SmolLM2 file (pulled by `make test`) and isolated data dirs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_home() -> Path:
    env = os.environ.get("OMNI_HOME")
    if env:
        return Path(env)
    import llm

    return Path(llm.user_dir()) / "omni"


def find_smollm2() -> Path | None:
    candidates = []
    if os.environ.get("OMNI_TEST_MODEL"):
        candidates.append(Path(os.environ["OMNI_TEST_MODEL"]))
    candidates.append(_default_home() / "files" / "smollm2" / SMOLLM2_FILE)
    for path in candidates:
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = find_smollm2()
    if path is None:
        message = "SmolLM2 GGUF not found: run `make model` (llm omni pull smollm2) first"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI pulls it first, so absence is a real failure there
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2_golden() -> dict:
    return json.loads((DATA / "smollm2-llamacpp.json").read_text())


@pytest.fixture
def omni_home(tmp_path, monkeypatch) -> Path:
    """A private OMNI_HOME and llm user dir, so tests never touch the user's.

    A shim that ``llm -m omni/...`` starts in the background listens on loopback only, with
    no mDNS (tests send nothing beyond this machine), and is stopped afterwards.
    """
    home = tmp_path / "omni"
    monkeypatch.setenv("OMNI_HOME", str(home))
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    monkeypatch.delenv("OMNI_SHIM", raising=False)
    monkeypatch.setenv("OMNI_SHIM_ARGS", "--host 127.0.0.1 --port 0 --no-mdns --max-memory 1GiB")
    yield home
    from llm_omninode.client import local_shim

    found = local_shim(home)
    if found is not None:
        os.kill(found[2], signal.SIGTERM)
