"""Pull by name from the Hugging Face hub, as Ollama names them: ``hf.co/USER/REPO[:QUANT]``.

The repository is listed once (its files with the sha256 of their LFS objects, and the commit,
which then pins every download); QUANT picks the GGUF as Ollama does (the tag, case-insensitive,
in the file name; Q4_K_M by default when there are several). Files come through
``huggingface_hub`` into ``HOME/files/hf.co/USER/REPO/`` (its local-folder cache: a file already
there at the listed commit is not fetched again; a dropped connection is resumed with a Range
request). Every file is checked against the listed sha256 before it is used; parts of a split
GGUF are then joined into one file (gguf_split.py) and removed. ``HF_ENDPOINT`` points it at
another hub (tests serve one on loopback); ``HF_TOKEN`` is used as ``huggingface_hub`` uses it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .gguf_split import split_name
from .registry import check_alias
from .sources import Progress, PullBar, PullError, sha256_file
from .store import is_disk_full, storage_full

HOSTS = ("hf.co", "huggingface.co")
DEFAULT_QUANT = "Q4_K_M"
MAX_FILES = 10_000  # a listing longer than this is refused, not walked
# a user or repository name as the hub allows them (letters, digits, '.', '_', '-'; <= 96)
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# a path inside a repository that is safe to write under ours: no "..", no absolute path
_SAFE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(?:/[A-Za-z0-9_][A-Za-z0-9._+-]*)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# the quant tag at the end of a GGUF's name: "...-Q4_K_M.gguf", "....IQ3_XXS.gguf", "-bf16.gguf"
_QUANT_AT_END = re.compile(r"(?:^|[-._])((?:I?Q|TQ)[0-9][A-Za-z0-9_]*|B?F16|F32)$", re.IGNORECASE)


class HubError(PullError):
    """A pull from the hub that cannot go on; ``status`` is the HTTP status the API answers."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HubName:
    host: str  # as typed: hf.co or huggingface.co
    user: str
    repo: str
    tag: str | None  # None: no tag, or "latest"

    @property
    def repo_id(self) -> str:
        return f"{self.user}/{self.repo}"

    def typed(self) -> str:
        """The name as asked (":latest" for no tag): registered, so clients can use it as is."""
        return f"{self.host}/{self.repo_id}:{self.tag or 'latest'}"


def parse_hub_name(name: str) -> HubName | None:
    """The hub name in ``name`` (``omni/`` allowed before it); None if it names no hub.

    A name on a hub host that is not ``USER/REPO[:TAG]`` of the hub's characters is a
    HubError (400): it never reaches a URL or a path.
    """
    bare = name.removeprefix("omni/")
    host, _, rest = bare.partition("/")
    if host.lower() not in HOSTS:
        return None
    path, _, tag = rest.partition(":")
    pieces = path.split("/")
    if len(pieces) != 2 or not all(_REPO_PART.fullmatch(p) and ".." not in p for p in pieces):
        raise HubError(f"{name!r}: expected {host}/USER/REPO[:QUANT]", 400)
    if tag and not _TAG.fullmatch(tag):
        raise HubError(f"{name!r}: the quant tag may hold letters, digits, '.', '_', '-'", 400)
    hub_name = HubName(host.lower(), pieces[0], pieces[1], None if tag in ("", "latest") else tag)
    try:  # a name we could not register is refused before any download
        check_alias(hub_name.typed())
    except ValueError as exc:
        raise HubError(f"{name!r}: {exc}", 400) from exc
    return hub_name


@dataclass(frozen=True)
class HubFile:
    path: str  # inside the repository
    sha256: str  # the LFS object id the hub lists
    size: int


@dataclass(frozen=True)
class HubChoice:
    """What a pull fetches: one GGUF, or the parts of one split GGUF, at a pinned commit."""

    name: HubName
    commit: str
    quant: str
    filename: str  # the GGUF as it will be on disk (a split one: its parts' joined name)
    files: tuple[HubFile, ...]  # one file, or the parts in order

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        """The one digest a pull's progress names (a split GGUF's: its first part's)."""
        return f"sha256:{self.files[0].sha256}"

    def names(self) -> list[str]:
        """Names to register: ``hf.co/USER/REPO:QUANT`` first, then the name as asked."""
        canonical = f"hf.co/{self.name.repo_id}:{self.quant}"
        return list(dict.fromkeys([canonical, self.name.typed()]))


def quant_of(path: str) -> str | None:
    """The quant tag ending a GGUF's name (split suffix removed), upper-cased; None if none."""
    joined = split_name(path)
    stem = Path(joined[0] if joined else path).name.removesuffix(".gguf")
    m = _QUANT_AT_END.search(stem)
    return m[1].upper() if m else None


def choose_file(name: HubName, files: Sequence[HubFile]) -> tuple[str, str, tuple[HubFile, ...]]:
    """(quant, file name, files) of the GGUF that ``name`` picks among a repository's files.

    GGUFs are grouped (a split one's parts as one) and vision projectors (``mmproj``) left
    out. A tag picks the GGUF whose name ends with it or holds it between separators,
    case-insensitively; no tag picks the only GGUF, or the Q4_K_M one among several.
    """
    groups: dict[str, dict[int, HubFile]] = {}
    counts: dict[str, int] = {}
    for f in files:
        if not f.path.lower().endswith(".gguf") or "mmproj" in Path(f.path).name.lower():
            continue
        split = split_name(f.path)
        key, no, count = split if split else (f.path, 1, 1)
        if counts.setdefault(key, count) != count:
            raise HubError(f"{name.repo_id}: the parts of {key} disagree on their count")
        groups.setdefault(key, {})[no] = f
    if not groups:
        raise HubError(f"{name.repo_id} has no GGUF file (with a listed sha256)", 404)
    wanted = name.tag or DEFAULT_QUANT
    exact = [k for k in groups if (quant_of(k) or "").lower() == wanted.lower()]
    token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(wanted)}(?![A-Za-z0-9_])", re.IGNORECASE)
    matches = exact or [k for k in groups if token.search(k)]
    if not name.tag and len(groups) == 1:
        matches = list(groups)
    if len(matches) != 1:
        have = ", ".join(f"{quant_of(k) or '?'} ({k})" for k in sorted(groups))
        if not matches:
            what = f"no {wanted} GGUF" if name.tag else f"several GGUFs and none is {wanted}"
            raise HubError(f"{name.repo_id} has {what}; it has: {have}", 404)
        raise HubError(f"{name.repo_id}: {wanted} matches several GGUFs: {', '.join(matches)}")
    key = matches[0]
    parts = groups[key]
    missing = [n for n in range(1, counts[key] + 1) if n not in parts]
    if missing:
        raise HubError(f"{name.repo_id}: {key} lacks part(s) {missing} of {counts[key]}", 404)
    quant = quant_of(key) or re.sub(r"[^A-Za-z0-9._-]", "-", name.tag or Path(key).stem)
    return quant, key, tuple(parts[n] for n in sorted(parts))


def _endpoint() -> str | None:
    # read at each pull (huggingface_hub reads HF_ENDPOINT once, at import)
    return os.environ.get("HF_ENDPOINT") or None


def listed_files(siblings: Any) -> list[HubFile]:
    """The files of a listing that can be pulled: a safe path and an LFS sha256 and size."""
    if not isinstance(siblings, list) or len(siblings) > MAX_FILES:
        raise HubError(f"the hub's listing has no file list of at most {MAX_FILES} files", 502)
    files = []
    for s in siblings:
        lfs = getattr(s, "lfs", None)
        path = getattr(s, "rfilename", None)
        if not (isinstance(path, str) and _SAFE_PATH.fullmatch(path) and lfs):
            continue
        sha, size = lfs.get("sha256"), lfs.get("size")
        if isinstance(sha, str) and _SHA256.fullmatch(sha) and type(size) is int and size > 0:
            files.append(HubFile(path, sha, size))
    return files


def plan_pull(name: HubName) -> HubChoice:
    """List the repository (one request) and choose what to fetch."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi(endpoint=_endpoint()).model_info(name.repo_id, files_metadata=True)
    except RepositoryNotFoundError as exc:
        why = f"{name.repo_id}: no such repository on the hub (or no access)"
        raise HubError(why, 404) from exc
    except Exception as exc:  # HTTP statuses, and the network's errors once retries are spent
        if is_disk_full(exc):
            raise
        raise HubError(f"{name.repo_id}: the hub could not be listed: {exc}", 502) from exc
    commit = info.sha
    if not (isinstance(commit, str) and _COMMIT.fullmatch(commit)):
        raise HubError(f"{name.repo_id}: the hub's listing has no commit id", 502)
    quant, filename, files = choose_file(name, listed_files(info.siblings))
    return HubChoice(name, commit, quant, filename, files)


def repo_dir(home: Path, name: HubName) -> Path:
    return home / "files" / "hf.co" / name.user / name.repo


def _inside(base: Path, path: str) -> Path:
    target = (base / path).resolve()
    if not target.is_relative_to(base.resolve()):
        raise HubError(f"{path!r} is not a path inside the repository", 502)
    return target


def _counting_bar(count: Callable[[int], None]) -> type:
    """A stand-in for tqdm that huggingface_hub moves: it draws nothing and counts the bytes
    written. Having ``update_transfer`` makes it one bar for both of a Xet download's counts
    (network bytes, bytes written); only the second is counted."""

    class Counting:
        def __init__(self, *args: Any, total: int | None = None, **kwargs: Any) -> None:
            self.n = 0
            self.total = total

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            if n:
                self.n += int(n)
                count(int(n))

        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        set_transfer_postfix_str = set_postfix_str

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            pass

    return Counting


def _forget(base: Path, path: str) -> None:
    """Remove a downloaded file and huggingface_hub's record of it (it is not to be reused)."""
    _inside(base, path).unlink(missing_ok=True)
    (base / ".cache" / "huggingface" / "download" / f"{path}.metadata").unlink(missing_ok=True)


def fetch(
    choice: HubChoice,
    home: Path,
    *,
    progress: Progress | None = None,
    phase: Callable[[str], None] | None = None,
) -> Path:
    """Download what ``choice`` names, check every file's sha256, join a split GGUF.

    Returns the GGUF's path. ``progress`` sees (bytes, all files' bytes) of one bar for the
    whole pull; ``phase`` hears "verifying sha256 digest" once the bytes are here. A file whose
    bytes do not match is removed and the pull fails (the parts that match are kept). Pulls of one
    repository wait for each other (a lock file in its folder), in one process or several.
    """
    base = repo_dir(home, choice.name)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".omni-pull.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        return _fetch(choice, base, progress, phase)


def _fetch(
    choice: HubChoice,
    base: Path,
    progress: Progress | None,
    phase: Callable[[str], None] | None,
) -> Path:
    from huggingface_hub import hf_hub_download

    target = _inside(base, choice.filename)
    joined = len(choice.files) > 1
    record = target.with_name(target.name + ".parts.json")  # what a joined file was made of
    oids = [f.sha256 for f in choice.files]
    bar = PullBar(choice.total, progress)
    if joined and target.is_file() and _read_oids(record) == oids:
        bar.to(choice.total)  # joined from verified parts before
        return target
    done = 0
    paths = []
    for f in choice.files:
        moved = [0]

        def count(n: int, start: int = done, moved: list[int] = moved, size: int = f.size) -> None:
            moved[0] += n  # back down when a resumed download starts over
            bar.to(start + max(0, min(moved[0], size)))

        try:
            local = hf_hub_download(
                choice.name.repo_id, f.path, revision=choice.commit, local_dir=base,
                endpoint=_endpoint(), tqdm_class=cast(Any, _counting_bar(count)),
            )  # fmt: skip
        except Exception as exc:  # as in plan_pull; a full disk is its own error (507)
            if is_disk_full(exc):
                raise
            why = f"{choice.name.repo_id}: {f.path} could not be downloaded: {exc}"
            raise HubError(why, 502) from exc
        paths.append(Path(local))
        done += f.size
        bar.to(done)
    if phase:
        phase("verifying sha256 digest")
    wrong = []
    for f, path in zip(choice.files, paths, strict=True):
        got = sha256_file(path)
        if got != f.sha256:
            _forget(base, f.path)  # the others are right: a later pull uses them
            wrong.append(f"{f.path}: sha256 {got} does not match the hub's {f.sha256}")
    if wrong:
        raise HubError("; ".join(wrong))
    if not joined:
        return paths[0]
    from .gguf_split import join_split

    try:
        join_split(paths, target)
    except Exception as exc:
        if is_disk_full(exc):  # the verified parts stay: a pull once there is room uses them
            keep = "the partly joined file was removed; the downloaded parts are kept"
            raise storage_full(choice.filename, base, choice.total, keep) from exc
        for f in choice.files:  # not a model we can read: not kept for the next pull
            _forget(base, f.path)
        raise
    for f in choice.files:  # joined: the parts are not needed any more
        _forget(base, f.path)
    record.write_text(json.dumps(oids))
    return target


def _read_oids(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, list) else None
