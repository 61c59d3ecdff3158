"""Where OmniNode keeps its state, and the alias table read at plugin start-up.

Only the standard library here: `register_models` runs on every `llm` invocation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import settings


def omni_home() -> Path:
    """``$OMNI_HOME``, else ``llm.user_dir()/omni``."""
    env = settings.home()
    if env is not None:
        return env
    import llm

    return Path(llm.user_dir()) / "omni"


SHIM_STATE_FILE = "shim.json"  # a running shim's pid and address, for the local plugin
SHIM_LOCK_FILE = "shim.lock"  # flock'ed by the shim that owns the data directory; its pid


class DataDirInUse(RuntimeError):
    """Another process (an omni-shim) holds the data directory's lock."""

    def __init__(self, home: Path, pid: int | None) -> None:
        self.home, self.pid = home, pid
        who = f"omni-shim pid {pid}" if pid else "another omni-shim"
        super().__init__(
            f"data dir {home} is in use by {who} "
            "(stop it with `llm omni stop` or pick another --data-dir)"
        )


def _lock_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_data_dir(home: Path, wait: float = 1.0) -> int | None:
    """Make this process the one owner of the data directory ``home`` until it exits.

    An exclusive ``flock`` on ``home/shim.lock`` (which then holds our pid), never released
    on purpose: the kernel drops it when the process ends, however it ends (a ``kill -9``
    leaves no stale lock behind). Another holder -> DataDirInUse naming its pid. ``wait``
    covers a plugin that probes the lock (``shim_lock_holder``) at that very moment.
    Returns the lock's descriptor, or None where there is no ``flock`` (Windows: no lock is
    taken; two shims there must be kept apart by hand).
    """
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt's byte-range locks would do; not done yet
        return None
    import time

    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / SHIM_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                pid = _lock_pid(fd)
                os.close(fd)
                raise DataDirInUse(home, pid) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def data_dir_owner(home: Path) -> int | None:
    """The pid of the shim that owns ``home`` (holds its lock), if one does and said it."""
    if not data_dir_locked(home):
        return None
    try:
        text = (home / SHIM_LOCK_FILE).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def data_dir_locked(home: Path) -> bool | None:
    """Whether a shim owns ``home`` now (holds its lock); None where that cannot be told
    (no ``flock``: Windows; no lock file)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:  # no lock file: no shim ever ran here, or one from before the lock (cannot tell)
        fd = os.open(home / SHIM_LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:  # shared and at once: a shim taking the lock right now retries for a second
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


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
