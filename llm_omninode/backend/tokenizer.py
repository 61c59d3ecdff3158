"""Tokenizer built from a GGUF file's ``tokenizer.ggml.*`` metadata, matching llama.cpp.

Two vocabulary kinds are supported, the ones llama.cpp calls BPE and SPM:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The text is cut into words by the
  pre-tokenizer regexes llama.cpp picks from ``tokenizer.ggml.pre`` (see ``PRE_TYPES``), each
  word is mapped to GPT-2's byte alphabet and merged by rank. The regex splitting and the merging
  run in the Hugging Face ``tokenizers`` library (a ``BPE`` model on the GGUF vocab and merges,
  ``Split`` pre-tokenizers with llama.cpp's regexes in "isolated" mode, then ``ByteLevel``),
  which reproduces llama.cpp's ``unicode_regex_split`` + ``llm_tokenizer_bpe_session`` and is
  much faster than Python. A missing or ``"default"`` pre-tokenizer uses llama.cpp's default
  regexes (with a logged warning, as llama.cpp does); an unknown name raises TokenizerError,
  as llama.cpp refuses to load such a file.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE by scores (``▁`` for spaces,
  ``<0xNN>`` byte fallback, ``add_space_prefix``), a direct port of ``llm_tokenizer_spm_session``.

Special tokens are cut out of the text first, exactly like llama.cpp's
``tokenizer_st_partition``: CONTROL and UNKNOWN tokens only when ``parse_special=True``, but
USER_DEFINED tokens always (llama.cpp and HF ``tokenizers`` both pre-split user-defined tokens
whatever ``parse_special`` says). BOS/EOS are added when ``add_special=True`` and the file's
``tokenizer.ggml.add_bos_token``/``add_eos_token`` ask for it; when absent, llama.cpp's defaults
apply (SPM adds BOS; BPE does not, except the llama3 pre-tokenizer family).
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .spm import spm_tokenize
from .vocab_tables import (
    ASCII_SPACE,
    ATTR_BYTE,
    ATTR_CONTROL,
    ATTR_LSTRIP,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_SPECIAL,
    ATTR_UNDEFINED,
    ATTR_UNKNOWN,
    ATTR_USER_DEFINED,
    CHAR_TO_BYTE,
    EOG_TEXTS,
    EOT_TEXTS,
    FIM_PAD_TEXTS,
    FIM_REP_TEXTS,
    FIM_SEP_TEXTS,
    MAX_VOCAB,
    PRE_TYPES,
    SPECIAL_ID_KEYS,
    SURROGATE,
    TYPE_TO_ATTR,
    is_hex_byte_token,
)

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The GGUF tokenizer metadata is missing, malformed or of an unsupported kind."""


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Build with :meth:`from_metadata`."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    fim_pad_id: int | None
    fim_rep_id: int | None
    fim_sep_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]

    def __init__(self) -> None:  # use from_metadata
        raise TypeError("use Tokenizer.from_metadata(metadata)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (the ``tokenizer.*`` keys; ``general.name`` is consulted
        for llama.cpp's Phi-3 special-token heuristic)."""
        self = object.__new__(cls)
        self._load(metadata)
        return self

    def _load(self, md: Mapping[str, Any]) -> None:
        model = md.get("tokenizer.ggml.model")
        if not isinstance(model, str):
            raise TokenizerError("GGUF has no tokenizer.ggml.model: no vocabulary to tokenize with")
        if model == "gpt2":
            self.model = "gpt2"
            ids = dict(bos_id=11, eos_id=11, unk_id=None)  # llama.cpp's BPE defaults
        elif model == "llama":
            self.model = "llama"
            ids = dict(bos_id=1, eos_id=2, unk_id=0)  # llama.cpp's SPM defaults
        else:
            raise TokenizerError(
                f"unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2' byte-level BPE, "
                "'llama' SentencePiece)"
            )

        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens list")
        if len(tokens) > MAX_VOCAB:
            raise TokenizerError(f"vocabulary of {len(tokens)} tokens is implausibly large")
        n = len(tokens)
        texts: list[str] = []
        token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TokenizerError(f"tokenizer.ggml.tokens[{i}] is not a string")
            if not t:
                t = f"[EMPTY_{i}]"  # what llama.cpp does with an empty token
            if token_to_id.setdefault(t, i) != i:
                raise TokenizerError(
                    f"duplicate token in vocabulary: {t!r} has ids {token_to_id[t]} and {i}"
                )
            texts.append(t)
        self._texts = texts
        self._token_to_id = token_to_id
        self.vocab_size = n

        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            if not isinstance(types, (list, tuple)) or len(types) < n:
                raise TokenizerError("tokenizer.ggml.token_type is shorter than the vocabulary")
            attrs = [TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in types[:n]]
        self._attrs = attrs

        scores = md.get("tokenizer.ggml.scores")
        if scores is not None and (not isinstance(scores, (list, tuple)) or len(scores) < n):
            raise TokenizerError("tokenizer.ggml.scores is shorter than the vocabulary")
        self._scores = list(scores[:n]) if scores is not None else None

        self.pre = md.get("tokenizer.ggml.pre")
        ignore_merges = False
        add_bos = False
        if self.model == "gpt2":
            pre = self.pre
            if pre is None or pre == "":
                log.warning(
                    "GGUF has no tokenizer.ggml.pre: using llama.cpp's 'default' pre-tokenizer; "
                    "generation quality may be degraded"
                )
                pre = "default"
            if pre not in PRE_TYPES:
                raise TokenizerError(
                    f"unknown pre-tokenizer type tokenizer.ggml.pre={pre!r} (supported: "
                    + ", ".join(sorted(PRE_TYPES))
                    + ")"
                )
            regexes, ignore_merges, add_bos = PRE_TYPES[pre]
            if pre in ("glm4", "chatglm-bpe"):
                ids["bos_id"] = None
            self.add_space_prefix = False
        else:
            regexes = []
            add_bos = True
            self.add_space_prefix = True
        self._regexes = regexes
        self._ignore_merges = ignore_merges
        asp = md.get("tokenizer.ggml.add_space_prefix")
        if isinstance(asp, bool):
            self.add_space_prefix = asp

        # special token ids: defaults, then metadata (out-of-range values are ignored)
        for _, attr in SPECIAL_ID_KEYS:
            setattr(self, attr, None)
        for attr, value in ids.items():
            setattr(self, attr, value if value is not None and value < n else None)
        for key, attr in SPECIAL_ID_KEYS:
            value = md.get("tokenizer.ggml." + key)
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if 0 <= value < n:
                setattr(self, attr, value)
            else:
                log.warning("bad special token tokenizer.ggml.%s = %s: ignored", key, value)

        add_bos_md = md.get("tokenizer.ggml.add_bos_token")
        add_eos_md = md.get("tokenizer.ggml.add_eos_token")
        self.add_bos = add_bos_md if isinstance(add_bos_md, bool) else add_bos
        self.add_eos = add_eos_md if isinstance(add_eos_md, bool) else False
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true but there is no BOS token")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError("tokenizer.ggml.add_eos_token is true but there is no EOS token")

        self._detect_special(md)

        # llama.cpp's cache_special_tokens: longest text first (ties: lower id first, stable)
        mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
        special = [i for i, a in enumerate(self._attrs) if a & mask]
        special.sort(key=lambda i: (-len(self._texts[i]), i))
        self._special_ids = special
        # for a quick "which special tokens occur at all" test (see _special_candidates)
        self._special_lengths = sorted({len(self._texts[i]) for i in special})
        firsts = "".join(re.escape(c) for c in sorted({self._texts[i][0] for i in special}))
        self._special_starts = re.compile(f"[{firsts}]") if firsts else None
        self._piece_cache: list[bytes | None] = [None] * n

        if self.model == "gpt2":
            self._hf = self._build_hf(md)
        else:
            self._hf = None

    def _detect_special(self, md: Mapping[str, Any]) -> None:
        """EOT/FIM detection and the end-of-generation set, as llama.cpp derives them."""
        attrs = self._attrs
        tid = self._token_to_id

        def find(texts: Sequence[str]) -> int | None:
            found = [tid[t] for t in texts if t in tid]
            return min(found) if found else None

        def force_control(i: int) -> None:
            if not attrs[i] & ATTR_CONTROL:
                attrs[i] |= ATTR_CONTROL

        for attr, texts in (
            ("eot_id", EOT_TEXTS),
            ("eom_id", ("<|eom_id|>",)),
            ("fim_pad_id", FIM_PAD_TEXTS),
            ("fim_rep_id", FIM_REP_TEXTS),
            ("fim_sep_id", FIM_SEP_TEXTS),
        ):
            if getattr(self, attr) is None:
                found = find(texts)
                if found is not None:
                    setattr(self, attr, found)
                    force_control(found)
        for marked in (
            ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
             "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
            ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
             "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
            ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
             "▁<MID>", "<|code_middle|>", "<|middle|>"),
        ):  # fmt: skip
            for t in marked:  # llama.cpp marks these control even though they are not EOG
                if t in tid:
                    force_control(tid[t])

        eog: set[int] = set()
        for i in (self.fim_pad_id, self.fim_rep_id, self.fim_sep_id):
            if i is not None:
                eog.add(i)
        for t in EOG_TEXTS:
            if t in tid:
                eog.add(tid[t])
                force_control(tid[t])
        # gpt-oss: these always render (llama.cpp sets them USER_DEFINED)
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if t in tid:
                attrs[tid[t]] = ATTR_USER_DEFINED
        for i in (self.eos_id, self.eot_id, self.eom_id):
            if i is not None:
                eog.add(i)
        vocab = self._texts
        # o200k_harmony / solar-open: "<|end|>" is not the end of generation there
        eog_texts = {vocab[i] for i in eog}
        if "<|end|>" in eog_texts and (
            ("<|return|>" in eog_texts and "<|call|>" in eog_texts)
            or ({"<|call|>", "<|calls|>"} & eog_texts and "<|flush|>" in eog_texts)
        ):
            end = tid["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "<|tool_response>" in eog_texts and "</s>" in eog_texts:  # gemma4 workaround
            s = tid["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        self.eog_ids = frozenset(eog)

        # Phi-3: special tokens swallow the whitespace after them (llama.cpp name heuristic)
        name = md.get("general.name")
        if isinstance(name, str) and ("phi-3" in name.lower() or "phi3" in name.lower()):
            mask = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
            for i, a in enumerate(attrs):
                if a & mask:
                    attrs[i] |= ATTR_RSTRIP
            if "</s>" in tid:
                attrs[tid["</s>"]] |= ATTR_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in tid:
                    attrs[tid[t]] &= ~ATTR_RSTRIP

    def _build_hf(self, md: Mapping[str, Any]):
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        merges_md = md.get("tokenizer.ggml.merges")
        if not isinstance(merges_md, (list, tuple)):
            raise TokenizerError("gpt2 tokenizer without tokenizer.ggml.merges")
        tid = self._token_to_id
        merges: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        dropped = 0
        for m in merges_md:
            if not isinstance(m, str):
                raise TokenizerError("tokenizer.ggml.merges holds a non-string")
            pos = m.find(" ", 1)  # like llama.cpp: a leading space belongs to the left part
            if pos < 0:
                dropped += 1
                continue
            a, b = m[:pos], m[pos + 1 :]
            pair = (a, b)
            # HF refuses merges whose parts or result are not tokens; llama.cpp would merge and
            # then fall back to bytes, which cannot happen for a vocabulary made by a trainer.
            if pair in seen or a not in tid or b not in tid or (a + b) not in tid:
                dropped += 1
                continue
            seen.add(pair)
            merges.append(pair)
        if dropped:
            log.warning("ignored %d unusable/duplicate BPE merges", dropped)
        try:
            bpe = models.BPE(
                vocab=dict(tid), merges=merges, ignore_merges=self._ignore_merges, fuse_unk=False
            )
            hf = HFTokenizer(bpe)
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self._regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"cannot build BPE tokenizer: {e}") from e
        return hf

    # ------------------------------------------------------------------ encoding
    def encode(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text`` as llama.cpp's ``llama_tokenize`` gives them.

        ``add_special``: add BOS/EOS where the model asks for it. ``parse_special``: turn the
        text of control tokens (e.g. ``<|im_start|>``) into those tokens; without it they are
        tokenized as plain text. User-defined tokens are always recognized (as in llama.cpp).
        """
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        # lone surrogates cannot be UTF-8; llama.cpp turns invalid UTF-8 into U+FFFD
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = SURROGATE.sub("\ufffd", text)
        fragments = self._partition(text, parse_special)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]
        if self.model == "gpt2":
            hf = self._hf
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(hf.encode(frag, add_special_tokens=False).ids)
        else:
            prev_special = True  # a space prefix goes before the first text and after specials
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    spm = frag.replace(" ", "\u2581")
                    out += spm_tokenize(spm, self._token_to_id, self._scores, self.unk_id)
                    prev_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    def _special_candidates(self, text: str) -> list[int]:
        """The special tokens (in partition order) whose text occurs somewhere in ``text``.

        Vocabularies such as Gemma's have thousands of control/user-defined tokens; testing
        each against a long prompt would dominate tokenization. Every substring that starts
        where some special token could start, at every special-token length, goes into a set
        instead, and only tokens found there take part (same result, far less work)."""
        ids = self._special_ids
        if len(ids) <= 64 or self._special_starts is None:
            return ids
        seen: set[str] = set()
        lengths = self._special_lengths
        for m in self._special_starts.finditer(text):
            i = m.start()
            seen.update(text[i : i + n] for n in lengths)
        if not seen:
            return []
        texts = self._texts
        return [i for i in ids if texts[i] in seen]

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of the text (llama.cpp ``tokenizer_st_partition``)."""
        if not text:
            return []
        frags: list[str | int] = [text]
        attrs = self._attrs
        texts = self._texts
        skip = ATTR_CONTROL | ATTR_UNKNOWN
        for sid in self._special_candidates(text):
            a = attrs[sid]
            if not parse_special and a & skip:
                continue
            tok = texts[sid]
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                start = 0
                while True:
                    hit = f.find(tok, start)
                    if hit < 0:
                        break
                    left = f[start:hit]
                    if a & ATTR_LSTRIP:
                        left = left.rstrip(ASCII_SPACE)
                    if left:
                        new.append(left)
                    new.append(sid)
                    start = hit + len(tok)
                    if a & ATTR_RSTRIP:
                        while start < len(f) and f[start] in ASCII_SPACE:
                            start += 1
                if start < len(f):
                    new.append(f[start:])
            frags = new
        return frags

    def split_words(self, text: str) -> list[str]:
        """The words the BPE pre-tokenizer cuts ``text`` into (no special-token handling);
        SentencePiece vocabularies do not pre-split, so they return ``[text]``."""
        if self._hf is None:
            return [text] if text else []
        c2b = CHAR_TO_BYTE
        words = self._hf.pre_tokenizer.pre_tokenize_str(text)
        return [bytes([c2b[c] for c in w]).decode("utf-8", "replace") for w, _ in words]

    # ------------------------------------------------------------------ decoding
    def token_text(self, id: int) -> str:
        """The vocabulary entry of one token, as stored in the GGUF."""
        return self._texts[id]

    def is_special(self, id: int) -> bool:
        """True for control/unknown tokens (the ones decode(skip_special=True) leaves out)."""
        return bool(self._attrs[id] & ATTR_SPECIAL)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token's piece (control tokens give their text), like
        llama.cpp's ``token_to_piece(special=true)``. Unused/undefined tokens give b""."""
        if not 0 <= id < self.vocab_size:
            raise IndexError(f"token id {id} out of range (vocabulary of {self.vocab_size})")
        cached = self._piece_cache[id]
        if cached is not None:
            return cached
        text = self._texts[id]
        a = self._attrs[id]
        if a & (ATTR_SPECIAL | ATTR_USER_DEFINED):
            piece = text.encode("utf-8")
        elif a & ATTR_NORMAL:
            if self.model == "gpt2":
                c2b = CHAR_TO_BYTE
                try:
                    piece = bytes([c2b[c] for c in text])
                except KeyError:  # not byte-level text: keep unmapped characters as UTF-8
                    piece = b"".join(
                        bytes([c2b[c]]) if c in c2b else c.encode("utf-8") for c in text
                    )
            else:
                piece = text.replace("\u2581", " ").encode("utf-8")
        elif a & ATTR_BYTE and is_hex_byte_token(text):
            try:
                piece = bytes([int(text[3:5], 16)])
            except ValueError:
                piece = b""
        else:
            piece = b""
        self._piece_cache[id] = piece
        return piece

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of a token sequence. Control/unknown tokens are left out when ``skip_special``;
        bytes that are not valid UTF-8 become U+FFFD. For SentencePiece vocabularies with
        ``add_space_prefix``, the leading space the encoder added is removed (after an optional
        BOS), like sentencepiece and llama.cpp's detokenizer."""
        ids = list(ids)
        first = 0
        if ids and self.bos_id is not None and ids[0] == self.bos_id and skip_special:
            first = 1
        buf = bytearray()
        strip = self.model == "llama" and self.add_space_prefix
        for k in range(first, len(ids)):
            i = ids[k]
            piece = b"" if skip_special and self.is_special(i) else self.token_bytes(i)
            if strip and k == first and piece.startswith(b" "):
                piece = piece[1:]
            buf += piece
        return buf.decode("utf-8", "replace")


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get text as soon as it is whole.

    Bytes of a UTF-8 character split across tokens are held back until the character is
    complete; invalid bytes become U+FFFD. Control tokens are skipped unless
    ``skip_special=False``.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, id: int) -> str:
        if self._skip and self._tok.is_special(id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(id))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
