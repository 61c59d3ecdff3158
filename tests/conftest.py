"""Shared fixtures: the real GGUF files (pulled by `make models`) and isolated data dirs.

SmolLM2 is the default model (marker ``model``); gemma-3-270m, Qwen2.5-Coder-0.5B and -1.5B
(Q4_K_M files, marker ``large_model``) are found where `llm omni pull` put them, or through
OMNI_TEST_GEMMA3 / OMNI_TEST_QWEN2 / OMNI_TEST_QWEN15.
"""

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


def _required(path: Path | None, source: str) -> Path:
    if path is None:
        message = f"{source} GGUF not found: run `make models` (llm omni pull {source}) first"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI pulls it first, so absence is a real failure there
        pytest.skip(message)
    return path


def find_pulled(source: str, env: str) -> Path | None:
    """A model file from ``env``, else where `llm omni pull SOURCE` leaves it."""
    from llm_omninode.backend.sources import find_source

    if os.environ.get(env):
        path = Path(os.environ[env])
        return path if path.is_file() else None
    path = _default_home() / "files" / source / find_source(source).filename
    return path if path.is_file() else None


# a test that asks for a real model file carries that model's marker, so `make unit`
# (-m "not model and not large_model ...") never reads one
MODEL_FIXTURES = {
    "smollm2_path": "model",
    "gemma3_path": "large_model",
    "qwen2_path": "large_model",
    "qwen15_path": "large_model",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            marker = MODEL_FIXTURES.get(fixture)
            if marker is not None and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _required(find_smollm2(), "smollm2")


@pytest.fixture(scope="session")
def smollm2_golden() -> dict:
    return json.loads((DATA / "smollm2-llamacpp.json").read_text())


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _required(find_pulled("gemma3-270m", "OMNI_TEST_GEMMA3"), "gemma3-270m")


@pytest.fixture(scope="session")
def qwen2_path() -> Path:
    return _required(find_pulled("qwen2.5-coder-0.5b", "OMNI_TEST_QWEN2"), "qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen15_path() -> Path:
    return _required(find_pulled("qwen2.5-coder-1.5b", "OMNI_TEST_QWEN15"), "qwen2.5-coder-1.5b")


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
    monkeypatch.setenv(
        "OMNI_SHIM_ARGS", "--host 127.0.0.1 --port 0 --no-mdns --max-memory 1GiB --api-port 0"
    )
    yield home
    from llm_omninode.client import local_shim

    found = local_shim(home)
    if found is not None:
        os.kill(found[2], signal.SIGTERM)
