"""Wheels written by tests: an offline package index for ``pull`` (pip --find-links)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def make_wheel(directory: Path, package: str, version: str, member: str, payload) -> Path:
    """A minimal valid wheel holding ``payload`` (bytes, or a Path to copy) at ``member``."""
    dist = package.replace("-", "_")
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        if isinstance(payload, Path):
            zf.write(payload, member)  # stored: a GGUF does not compress
        else:
            zf.writestr(member, payload)
        zf.writestr(
            f"{dist}-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n",
        )
        zf.writestr(
            f"{dist}-{version}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}-{version}.dist-info/RECORD", "")
    return wheel
