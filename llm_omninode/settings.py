"""Every ``OMNI_*`` environment variable, read here and nowhere else (the README lists them).

Each is read when asked for, not at import, so a test or a process that sets one before use is
heard. A malformed value is an error that names the variable, not a silent default.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

# name -> what it does (the README's table is written from this)
VARIABLES = {
    "OMNI_HOME": "data directory of `llm`'s own shim (default: llm's user dir /omni)",
    "OMNI_SHIM": "HOST:PORT of the shim `llm` talks to (default: start one on OMNI_HOME)",
    "OMNI_SHIM_ARGS": "extra omni-shim arguments for the shim `llm` starts",
    "OMNI_OPEN": "1: `llm` accepts shims outside its cluster",
    "OMNI_PIP_ARGS": "extra pip arguments of pulls (offline mirror: --no-index --find-links DIR)",
    "OMNI_ENGINE": "ggml (Linux default) or mlx (default elsewhere; on Linux: MLX's CPU device)",
    "OMNI_GGML_THREADS": "threads of a ggml stage (default: the shim's --threads, else every CPU)",
    "OMNI_GGML_REPACK": "0: weights as stored (a step's numbers then never depend on its batch)",
    "OMNI_WIRE_DTYPE": "float32 (default: splits bit-identical) or float16 hidden states",
    "OMNI_API_TOKEN": "the shim's HTTP API token (as --api-token; read by its command line)",
    "OMNI_ORIGINS": "more browser origins the shim's API allows (comma-separated, * wildcards)",
    "OMNI_PREFILL_PIECE": "prompt tokens per pipelined piece (0: the whole prompt at once)",
}


def _get(name: str) -> str:
    assert name in VARIABLES or name.startswith("OMNI_TEST_"), name
    return os.environ.get(name, "").strip()


def _positive_int(name: str, default: int, minimum: int = 1) -> int:
    text = _get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value}: expected at least {minimum}")
    return value


def _flag(name: str) -> bool:
    return _get(name).lower() in ("1", "true", "yes", "on")


def home() -> Path | None:
    text = _get("OMNI_HOME")
    return Path(text).expanduser() if text else None


def shim() -> str:
    return _get("OMNI_SHIM")


def shim_args() -> list[str]:
    return shlex.split(_get("OMNI_SHIM_ARGS"))


def open_trust() -> bool:
    return _flag("OMNI_OPEN")


def pip_args() -> list[str]:
    return shlex.split(_get("OMNI_PIP_ARGS"))


def engine() -> str:
    return _get("OMNI_ENGINE").lower()


def ggml_threads() -> int | None:
    text = _get("OMNI_GGML_THREADS")
    return _positive_int("OMNI_GGML_THREADS", 1) if text else None


def ggml_repack() -> bool:
    return _get("OMNI_GGML_REPACK") != "0"


def wire_dtype() -> str:
    name = _get("OMNI_WIRE_DTYPE").lower() or "float32"
    if name not in ("float32", "float16"):
        raise ValueError(f"OMNI_WIRE_DTYPE={name!r}: expected float32 or float16")
    return name


def prefill_piece() -> int:
    return _positive_int("OMNI_PREFILL_PIECE", 256, minimum=0)


def origins() -> list[str]:
    return [o.strip() for o in _get("OMNI_ORIGINS").split(",") if o.strip()]


def test_limit(name: str) -> int | None:
    """A test-only throttle (OMNI_TEST_*): a positive integer, else None."""
    text = _get(name)
    return int(text) if text.isdigit() and int(text) > 0 else None
