import numpy as np
import pytest
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.generate import Generation, StopMatcher, TokenPicker, generate
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.sampling import SamplingOptions
from llm_omninode.backend.tokenizer import Tokenizer


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["</s>", "User:"])
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("p>") == ("</p>", False)
    assert m.feed(" Us") == (" ", False)
    assert m.feed("er: hi") == ("", True)


def test_stop_matcher_without_stops_passes_through():
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tok") / "tiny.gguf")
    with open_gguf(path) as gguf:
        return Tokenizer.from_metadata(gguf.metadata)


class ScriptedModel:
    """Logits that force a scripted token sequence: a stand-in for the stages, which have
    their own tests; here only the loop's bookkeeping is under test."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls, self.freed = list(script), vocab, [], []

    def next_token(self, seq_id, x, options):
        assert (options is not None) == (not self.calls)  # options come with the prefill only
        self.calls.append(len(x))
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script.pop(0)] = 10.0
        return TokenPicker(options or SamplingOptions.greedy()).pick(logits)

    def free(self, seq_id):
        self.freed.append(seq_id)


def run(tokenizer, script, **kw):
    model = ScriptedModel(script, tokenizer.vocab_size)
    opts = kw.pop("options", SamplingOptions.greedy())
    chunks = list(
        generate(
            model.next_token,
            tokenizer,
            [5, 6, 7],
            options=opts,
            free=model.free,
            max_tokens=kw.pop("max_tokens", 50),
            **kw,
        )  # fmt: skip
    )
    return model, chunks


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special=False)


def test_prefill_once_then_one_token_per_round_until_eog(tokenizer):
    script = ids_of(tokenizer, "the cat") + [2]  # 2 = <|im_end|>... eos of the tiny vocab
    model, chunks = run(tokenizer, script)
    assert model.calls[0] == 3 and set(model.calls[1:]) == {1}
    assert "".join(c.text for c in chunks) == "the cat"
    last = chunks[-1]
    assert last.done and last.done_reason == "stop"
    assert last.prompt_tokens == 3 and last.completion_tokens == len(script) - 1
    assert len(model.freed) == 1  # the KV cache is released


def test_max_tokens_gives_length(tokenizer):
    script = ids_of(tokenizer, "a a a a a a a a")
    model, chunks = run(tokenizer, script, max_tokens=3)
    assert chunks[-1].done_reason == "length" and chunks[-1].completion_tokens == 3


def test_stop_string_cuts_text(tokenizer):
    script = ids_of(tokenizer, "one, two; three") + [2]
    _, chunks = run(tokenizer, script, stop=[";"])
    assert "".join(c.text for c in chunks) == "one, two"
    assert chunks[-1].done_reason == "stop"


def test_utf8_split_across_tokens_is_never_half_emitted(tokenizer):
    script = ids_of(tokenizer, "é€") + [2]  # byte tokens: 2 + 3 bytes
    _, chunks = run(tokenizer, script)
    texts = [c.text for c in chunks if c.text]
    assert "".join(texts) == "é€"
    assert all("\ufffd" not in t for t in texts)


def test_prompt_longer_than_context_is_refused(tokenizer):
    with pytest.raises(ValueError, match="context"):
        run(tokenizer, [0], context_length=2)


def test_max_tokens_zero_runs_nothing(tokenizer):
    model, chunks = run(tokenizer, [], max_tokens=0)
    assert model.calls == [] and len(chunks) == 1
    assert chunks[0].done_reason == "length" and chunks[0].prompt_tokens == 3


def test_generation_is_fed_ids_without_io(tokenizer):
    """The coordinator's half on its own: what the shim drives over the network."""
    gen = Generation(tokenizer, [5, 6], max_tokens=10, stop=["t"])
    out = []
    for token in ids_of(tokenizer, "a cat"):
        out += gen.accept(token)
        if gen.done:
            break
    out += gen.finish()
    assert "".join(c.text for c in out) == "a ca" and out[-1].done_reason == "stop"
    with pytest.raises(RuntimeError):
        gen.accept(5)


def test_token_picker_penalises_the_prompt_and_its_own_picks():
    opts = SamplingOptions(temperature=0.0, repeat_penalty=2.0, repeat_last_n=2)
    picker = TokenPicker(opts, recent=[0, 1, 2])
    assert picker.history == [1, 2]  # only the last repeat_last_n ids are kept
    logits = np.array([5.0, 4.9, 4.8, 4.0], dtype=np.float32)
    assert picker.pick(logits) == 0  # 1 and 2 are halved
    assert picker.pick(logits) == 1 and picker.history == [0, 1]


def test_logprobs_ride_with_the_chunks_and_the_answer_becomes_the_context(tokenizer):
    """Each accepted token's score goes out with the next chunk (held-back text included, a
    stop string's tokens in the last one); the prompt's scores once, however often a replay
    gives them; the done chunk holds prompt and answer ids (Ollama's context)."""
    from llm_omninode.backend.logprobs import TokenLogprob

    gen = Generation(tokenizer, [5, 6], max_tokens=10, stop=["t"])
    gen.score_prompt([TokenLogprob(5, None), TokenLogprob(6, -1.0)])
    gen.score_prompt([TokenLogprob(5, None), TokenLogprob(6, -9.0)])  # a replay's: ignored
    ids = ids_of(tokenizer, "a cat")
    out = []
    for i, token in enumerate(ids):
        out += gen.accept(token, TokenLogprob(token, -0.5 * i))
        if gen.done:
            break
    out += gen.finish()
    scored = [s.token for c in out for s in c.logprobs]
    assert scored == ids[: len(scored)] and len(scored) == gen.generated
    prompt = [s for c in out for s in c.prompt_logprobs]
    assert [s.logprob for s in prompt] == [None, -1.0] and out[0].prompt_logprobs
    assert out[-1].context == (5, 6, *ids[: gen.generated])
