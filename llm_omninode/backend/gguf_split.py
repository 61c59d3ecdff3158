"""GGUF files split by llama.cpp's ``gguf-split``: their names, and joining them into one file.

``gguf-split`` names the parts ``PREFIX-0000N-of-0000M.gguf`` (N from 1). Every part is a GGUF
of its own holding some of the tensors, in order; the first also holds all the model's metadata,
and each holds ``split.no`` (0-based, uint16), ``split.count`` (uint16) and
``split.tensors.count`` (int32, the tensors of all parts). Joining is what ``gguf-split --merge``
does: the first part's metadata less the ``split.*`` keys, then every part's tensors in order,
written as one GGUF that the hardened reader (and llama.cpp) reads like any other.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .gguf import GGUFError, GGUFFile, open_gguf
from .gguf_write import GGUFValue, write_gguf

SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def split_name(path: str) -> tuple[str, int, int] | None:
    """(the joined file's path, part number from 1, parts) of a part's path; None if not one."""
    m = SPLIT_NAME.fullmatch(path)
    if not m:
        return None
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count:
        return None
    return f"{m['prefix']}.gguf", no, count


def _split_field(gguf: GGUFFile, key: str) -> int:
    value = gguf.metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise GGUFError(0, f"{key} missing or not an integer: not a gguf-split part", gguf.path)
    return value


def _check_parts(parts: Sequence[GGUFFile]) -> None:
    total = 0
    for i, part in enumerate(parts):
        no, count = _split_field(part, "split.no"), _split_field(part, "split.count")
        if (no, count) != (i, len(parts)):
            said = f"split.no={no}, split.count={count}"
            raise GGUFError(0, f"part {i + 1} of {len(parts)} says {said}", part.path)
        total += len(part.tensors)
    stated = _split_field(parts[0], "split.tensors.count")
    if stated != total:
        raise GGUFError(0, f"split.tensors.count is {stated} but the parts hold {total}")
    first = parts[0]
    for part in parts[1:]:
        if part.version != first.version or part.alignment != first.alignment:
            raise GGUFError(0, "parts differ in GGUF version or alignment", part.path)


def join_split(parts: Sequence[str | os.PathLike[str]], target: Path) -> Path:
    """Write the parts (in order) as one GGUF at ``target``; written to a temporary name first.

    Every part is parsed by the hardened reader and the ``split.*`` fields checked against the
    parts given (numbering, count, tensors in all); duplicate tensor names are refused by the
    writer. Tensor bytes are streamed from the parts' mappings, not held in memory.
    """
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_gguf(p)) for p in parts]
        if not files:
            raise ValueError("no parts to join")
        _check_parts(files)
        first = files[0]
        metadata = {
            key: GGUFValue(value, *first.metadata_types[key])
            for key, value in first.metadata.items()
            if key not in SPLIT_KEYS
        }
        tensors = [
            (name, info.ggml_type, info.shape, f.tensor_data(name))
            for f in files
            for name, info in f.tensors.items()
        ]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".joining", dir=target.parent)
        os.close(fd)
        try:
            write_gguf(tmp, metadata, tensors, version=first.version, alignment=first.alignment)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
            del tensors  # the views, before the maps are closed
    return target
