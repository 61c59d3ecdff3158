"""SentencePiece-style tokenization (``tokenizer.ggml.model == "llama"``), as llama.cpp does it."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence


def spm_tokenize(
    text: str, tid: Mapping[str, int], scores: Sequence[float] | None, unk_id: int | None
) -> list[int]:
    """llama.cpp ``llm_tokenizer_spm_session::tokenize`` on one fragment (spaces escaped):
    merge the best-scoring adjacent pair that is a token until none is, then spell out each
    symbol, falling back to its byte tokens."""
    out: list[int] = []
    n = len(text)
    if n == 0:
        return out
    # symbols: start offset, length (0 = merged away), prev, next
    start = list(range(n))
    length = [1] * n
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    heap: list[tuple[float, int, int, int]] = []
    rev_merge: dict[str, tuple[int, int]] = {}

    def try_add(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        s = text[start[left] : start[left] + length[left] + length[right]]
        tok = tid.get(s)
        if tok is None:
            return
        score = scores[tok] if scores is not None else 0.0
        # max-heap on score, ties to the leftmost pair (llm_bigram_spm::comparator)
        heapq.heappush(heap, (-score, left, right, len(s)))
        rev_merge[s] = (left, right)

    for i in range(1, n):
        try_add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
            continue
        length[left] += length[right]
        length[right] = 0
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add(prev[left], left)
        try_add(left, nxt[left])

    def resegment(i: int) -> None:
        s = text[start[i] : start[i] + length[i]]
        tok = tid.get(s)
        if tok is not None:
            out.append(tok)
            return
        p = rev_merge.get(s)
        if p is None:
            for b in s.encode("utf-8"):
                append_byte(b, tid, unk_id, out)
            return
        resegment(p[0])
        resegment(p[1])

    i = 0
    while i != -1:
        resegment(i)
        i = nxt[i]
    return out


def append_byte(b: int, tid: Mapping[str, int], unk_id: int | None, out: list[int]) -> None:
    """The token of byte ``b`` (``<0xNN>``, or the character itself for ASCII)."""
    tok = tid.get(f"<0x{b:02X}>")
    if tok is None and b < 0x80:
        tok = tid.get(chr(b))
    if tok is None:
        # llama.cpp throws here (a vocabulary without byte fallback); we degrade to <unk>
        tok = unk_id
    if tok is not None:
        out.append(tok)
