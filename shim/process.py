"""This process and machine as the memory budget sees them: physical memory, resident and peak
resident bytes (Linux: /proc/self/status), and the device a stage computes on."""

from __future__ import annotations

import os
import platform
import resource


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def resident_bytes() -> int:
    """Resident memory now (VmRSS: anonymous and mapped file pages; elsewhere: the peak)."""
    now = _status_kib("VmRSS")
    return _max_rss() if now is None else now


def peak_bytes() -> int:
    """The most this process has been resident (VmHWM)."""
    peak = _status_kib("VmHWM")
    return _max_rss() if peak is None else peak


def device_name(engine: str) -> str:
    where = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    if engine == "mlx":
        import mlx.core as mx

        return f"mlx {mx.default_device()} ({where})"
    return f"ggml cpu ({where})"
