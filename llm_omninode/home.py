"""Where OmniNode keeps its state, and the alias table read at plugin start-up.

Only the standard library here: `register_models` runs on every `llm` invocation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def omni_home() -> Path:
    """``$OMNI_HOME``, else ``llm.user_dir()/omni``."""
    env = os.environ.get("OMNI_HOME")
    if env:
        return Path(env).expanduser()
    import llm

    return Path(llm.user_dir()) / "omni"


SHIM_STATE_FILE = "shim.json"  # a running shim's pid and address, for the local plugin


def aliases_path(home: Path | None = None) -> Path:
    return (home or omni_home()) / "aliases.json"


def read_aliases(home: Path | None = None) -> dict[str, str]:
    """alias -> model id; an unreadable table reads as empty (start-up must never fail)."""
    try:
        data = json.loads(aliases_path(home).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}
