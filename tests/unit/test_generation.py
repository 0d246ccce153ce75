"""Text in, text out: ``encode_prompt``, ``generate``, ``generate_ids`` and ``stream_generate`` on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ltri_rag.generation as generation
from ltri_rag import LtriConfig, LtriSession, encode_prompt, generate, generate_ids, stream_generate
from ltri_rag.generation import _pick, decoded_tokens, encode_text
from tests.unit.tiny_models import reference_greedy, tiny_model
from tests.unit.tiny_tokenizer import BOS_ID, EOS_ID, tiny_tokenizer

FULL = LtriConfig(mode="full")
PROMPT = "The quick brown fox jumps over the lazy dog. "
# long enough that a 16-token window evicts most of it
LONG_PROMPT = "In the beginning the stream was long, and the window small; " * 2
N = 20


def exact_ltri(**overrides: object) -> LtriConfig:
    """Every evicted span retrieved at its true position: the output must equal the unmodified model's."""
    base = dict(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=5, final_chunk_size=6, budget=100_000,
                page_size=5, evict_stride=4, block_size=8, span_min_len=2, span_max_len=12,
                position_scheme="absolute")
    base.update(overrides)
    return LtriConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def _eos(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids.update(gen if isinstance(gen, (list, tuple)) else [] if gen is None else [gen])
    return ids


def _greedy(model, tok, prompt, n: int = N) -> list[int]:
    """Manual greedy continuation of the unmodified model (no cache), cut before the first eos token."""
    ids = encode_prompt(tok, prompt)[None]
    out = reference_greedy(model, ids, n)[0].tolist()
    eos = _eos(model, tok)
    return out[: next((i for i, t in enumerate(out) if t in eos), len(out))]


@pytest.fixture(scope="module")
def expected(model, tok) -> list[int]:
    out = _greedy(model, tok, PROMPT)
    # preconditions that make the tests below meaningful: no early eos, one character per token
    assert len(out) == N and min(out) > 3, out
    return out


# ----------------------------------------------------------------------------------------------- encode_prompt
def test_encode_prompt_string(tok) -> None:
    ids = encode_prompt(tok, "ab c")
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == [BOS_ID] + tok("ab c", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[1:]) == "ab c"


def test_encode_prompt_messages_use_the_chat_template(tok) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>be brief\n<|user|>hi there\n<|assistant|>"
    ids = encode_prompt(tok, msgs)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist().count(BOS_ID) == 1 and ids[0] == BOS_ID  # the template's bos, not a second one
    assert tok.decode(ids, skip_special_tokens=True).endswith("<|assistant|>")
    assert torch.equal(encode_prompt(tok, tuple(msgs)), ids)


def test_encode_prompt_messages_without_template(tok) -> None:
    """Without a chat template the messages become ``role: content`` lines, encoded as a string would be: with
    the tokenizer's BOS (as LlamaIndex's default ``messages_to_prompt`` text gets it through ``LtriLLM``)."""
    plain = tiny_tokenizer(chat_template=None)
    msgs = [{"role": "user", "content": "hi"}]
    ids = encode_prompt(plain, msgs)
    assert ids.tolist() == [BOS_ID] + plain("user: hi\nassistant: ", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == encode_prompt(plain, "user: hi\nassistant: ").tolist()


def test_encode_prompt_never_doubles_the_bos(tok) -> None:
    """A string that already starts with the BOS token (a chat template's output passed on as text) keeps that one
    BOS; the LlamaIndex adapter encodes prompt text the same way."""
    from integrations.llama_index.llm import LtriLLM

    text = "<s><|user|>hi\n<|assistant|>"
    ids = encode_prompt(tok, text)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"] and ids.tolist().count(BOS_ID) == 1
    assert encode_text(tok, text) == ids.tolist()
    assert LtriLLM._encode(SimpleNamespace(_tokenizer=tok), text).tolist() == ids.tolist()
    assert LtriLLM._encode(SimpleNamespace(_tokenizer=tok), "ab").tolist() == encode_prompt(tok, "ab").tolist()


@pytest.mark.parametrize("bad", [42, None, ["hello"], [{"role": "user"}], [{"content": "x"}],
                                 [{"role": "user", "content": "x"}, "y"], b"bytes", 3.5])
def test_encode_prompt_rejects_other_types(tok, bad) -> None:
    with pytest.raises(TypeError, match="prompt must be"):
        encode_prompt(tok, bad)


@pytest.mark.parametrize("empty", ["", [], ()])
def test_encode_prompt_rejects_empty(tok, empty) -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_prompt(tok, empty)


def test_generate_rejects_bad_prompts(model, tok) -> None:
    with pytest.raises(TypeError):
        generate(model, tok, 42, FULL, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, "", FULL, max_new_tokens=2)
    with pytest.raises(TypeError):
        list(stream_generate(model, tok, [1, 2, 3], FULL, max_new_tokens=2))


# ---------------------------------------------------------------------------------------------------- greedy
def test_greedy_full_equals_manual_greedy(model, tok, expected) -> None:
    result = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N)
    assert result.token_ids == expected
    assert result.text == tok.decode(expected, skip_special_tokens=True)
    assert len(result.text) == N
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(PROMPT) + 1
    assert set(result.usage) == {"tokens", "memory_tokens", "retrieved_tokens"}
    assert result.prompt_tokens <= result.usage["tokens"] <= result.prompt_tokens + N
    assert generate(model, tok, PROMPT, FULL, max_new_tokens=N) == result.text


def test_prompt_as_ids_or_messages(model, tok, expected) -> None:
    ids = encode_prompt(tok, PROMPT)
    assert generate_ids(model, tok, ids, FULL, max_new_tokens=N).token_ids == expected
    msgs = [{"role": "user", "content": "hello"}]
    got = generate_ids(model, tok, msgs, FULL, max_new_tokens=8)
    assert got.prompt_tokens == encode_prompt(tok, msgs).numel()
    assert got.token_ids == _greedy(model, tok, msgs, 8)


def test_ltri_exact_config_equals_full_on_a_long_prompt(model, tok) -> None:
    full = generate_ids(model, tok, LONG_PROMPT, FULL, max_new_tokens=N)
    assert len(full.token_ids) >= 10
    cfg = exact_ltri()
    assert cfg.lookahead and cfg.consensus_weight > 0
    ltri = generate_ids(model, tok, LONG_PROMPT, cfg, max_new_tokens=N)
    assert ltri.token_ids == full.token_ids
    assert ltri.text == full.text and ltri.finish_reason == full.finish_reason
    # the prompt really went through eviction and retrieval
    assert ltri.usage["memory_tokens"] >= len(LONG_PROMPT) - 16 - 3 - 5 - 12
    assert ltri.usage["retrieved_tokens"] > 0
    assert ltri.usage["tokens"] == full.usage["tokens"]


def test_default_config_runs(model, tok) -> None:
    """No config: mode ``ltri`` with defaults (nothing evicted for a short prompt: equals full)."""
    out = generate_ids(model, tok, PROMPT, max_new_tokens=5)
    assert out.token_ids == generate_ids(model, tok, PROMPT, FULL, max_new_tokens=5).token_ids


# ----------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("config", [FULL, exact_ltri()], ids=["full", "ltri"])
def test_stream_pieces_concatenate_to_generate(model, tok, config) -> None:
    prompt = LONG_PROMPT if config.mode == "ltri" else PROMPT
    text = generate(model, tok, prompt, config, max_new_tokens=N)
    pieces = list(stream_generate(model, tok, prompt, config, max_new_tokens=N))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == text


def test_stream_with_stop_strings(model, tok, expected) -> None:
    text = tok.decode(expected)
    stop = text[7:10]
    want = text[: text.find(stop)]
    assert generate(model, tok, PROMPT, FULL, max_new_tokens=N, stop=[stop]) == want
    pieces = list(stream_generate(model, tok, PROMPT, FULL, max_new_tokens=N, stop=[stop]))
    assert "".join(pieces) == want
    assert stop not in "".join(pieces)


def test_stream_max_new_tokens_zero_yields_nothing(model, tok) -> None:
    assert list(stream_generate(model, tok, PROMPT, FULL, max_new_tokens=0)) == []


# -------------------------------------------------------------------------------------------- stop and eos
def test_stop_string_cuts_text(model, tok, expected) -> None:
    text = tok.decode(expected)
    stop = text[5:7]
    cut = text.find(stop)
    result = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == text[:cut]
    assert stop not in result.text
    # generation ended with the token that completed the stop string (one character per token)
    assert result.token_ids == expected[: cut + len(stop)]


def test_earliest_stop_string_wins(model, tok, expected) -> None:
    text = tok.decode(expected)
    late, early = text[12:14], text[3:5]
    result = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N, stop=[late, early])
    assert result.text == text[: text.find(early)]


def test_empty_and_absent_stop_strings_do_nothing(model, tok, expected) -> None:
    result = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N, stop=["", "\x00never\x00"])
    assert result.finish_reason == "length"
    assert result.token_ids == expected


def test_eos_ends_generation(model, tok, expected, monkeypatch) -> None:
    k = next(i for i in range(3, N) if expected[i] not in expected[:i])
    monkeypatch.setattr(model.generation_config, "eos_token_id", [expected[k], EOS_ID])
    result = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N)
    assert result.finish_reason == "stop"
    assert result.token_ids == expected[:k]
    assert result.text == tok.decode(expected[:k])
    assert "".join(stream_generate(model, tok, PROMPT, FULL, max_new_tokens=N)) == result.text


def test_tokenizer_eos_ends_generation(model, tok, expected, monkeypatch) -> None:
    """The tokenizer's eos ends generation too (here the model has none)."""
    k = next(i for i in range(3, N) if expected[i] not in expected[:i])
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)
    other = tiny_tokenizer()
    other.eos_token = tok.convert_ids_to_tokens(expected[k])
    assert other.eos_token_id == expected[k]
    result = generate_ids(model, other, PROMPT, FULL, max_new_tokens=N)
    assert result.finish_reason == "stop" and result.token_ids == expected[:k]


def test_max_new_tokens_zero_and_one(model, tok, expected) -> None:
    zero = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=0)
    assert zero.text == "" and zero.token_ids == [] and zero.finish_reason == "length"
    assert zero.prompt_tokens == len(PROMPT) + 1
    assert generate(model, tok, PROMPT, FULL, max_new_tokens=0) == ""
    one = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=1)
    assert one.token_ids == expected[:1] and one.finish_reason == "length"


# ------------------------------------------------------------------------------------------ one step ahead
def _session(model, tok, config: LtriConfig, prompt: str) -> tuple[LtriSession, torch.Tensor]:
    session = LtriSession(model, config)
    return session, session.feed(encode_prompt(tok, prompt))[0]


@pytest.mark.parametrize("config", [FULL, exact_ltri(), exact_ltri(position_scheme="contiguous", budget=24)],
                         ids=["full", "ltri_exact", "ltri_budget"])
def test_decoding_ahead_yields_the_tokens_of_one_step_at_a_time(model, tok, config) -> None:
    """Greedy decoding one step ahead (the step reading a token queued before the token is yielded) chooses the same
    tokens and leaves the session where one step at a time does, once every token is taken."""
    prompt = LONG_PROMPT if config.mode == "ltri" else PROMPT
    plain, logits = _session(model, tok, config, prompt)
    want = list(decoded_tokens(plain, logits, N, ahead=False))
    ahead, logits = _session(model, tok, config, prompt)
    got = list(decoded_tokens(ahead, logits, N, ahead=True))
    assert got == want and len(got) == N
    assert ahead.num_tokens == plain.num_tokens == len(encode_prompt(tok, prompt)) + N - 1
    assert ahead.usage() == plain.usage()
    if config.mode == "full":
        assert got == _greedy(model, tok, prompt)


def test_decoding_ahead_has_read_the_token_it_stopped_at(model, tok, expected) -> None:
    """A caller that stops after token k: one step at a time, the session has read k tokens; one step ahead, k + 1
    (the step for token k was queued before token k was seen)."""
    k = 5
    prompt_tokens = len(encode_prompt(tok, PROMPT))
    for ahead, read in ((False, k), (True, k + 1)):
        session, logits = _session(model, tok, FULL, PROMPT)
        tokens = decoded_tokens(session, logits, N, ahead=ahead)
        taken = [next(tokens) for _ in range(k + 1)]
        tokens.close()
        assert taken == expected[: k + 1]
        assert session.num_tokens == prompt_tokens + read


@pytest.mark.parametrize("max_tokens", [0, 1, 2])
def test_decoding_ahead_short_runs(model, tok, expected, max_tokens) -> None:
    session, logits = _session(model, tok, FULL, PROMPT)
    assert list(decoded_tokens(session, logits, max_tokens, ahead=True)) == expected[:max_tokens]
    assert session.num_tokens == len(encode_prompt(tok, PROMPT)) + max(0, max_tokens - 1)


def test_generation_ahead_stops_at_eos_and_stop_strings(model, tok, expected, monkeypatch) -> None:
    """``generate`` / ``stream_generate`` with decoding ahead forced on (the CUDA default) on a CPU model: the same
    text, tokens and finish reasons as one step at a time."""
    # a stop string from the long prompt's own continuation (model's end-of-sequence ids as they are), first seen
    # a few tokens in
    free = generate_ids(model, tok, LONG_PROMPT, exact_ltri(), max_new_tokens=N)
    j = next(i for i in range(2, len(free.token_ids) - 2)
             if (t := tok.decode(free.token_ids[i:i + 2])).strip() and t not in tok.decode(free.token_ids[:i + 1]))
    stop_text = tok.decode(free.token_ids[j:j + 2])
    cut = free.text[:free.text.index(stop_text)]
    k = next(i for i in range(3, N) if expected[i] not in expected[:i])
    eos = model.generation_config.eos_token_id
    runs = {}
    for ahead in (False, True):
        monkeypatch.setattr(generation, "DECODE_AHEAD", ahead)
        monkeypatch.setattr(model.generation_config, "eos_token_id", [expected[k], EOS_ID])
        by_eos = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N)
        streamed = "".join(stream_generate(model, tok, PROMPT, FULL, max_new_tokens=N))
        monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
        runs[ahead] = (by_eos, generate_ids(model, tok, LONG_PROMPT, exact_ltri(), max_new_tokens=N,
                                            stop=[stop_text]), streamed)
    for a, b in zip(runs[False][:2], runs[True][:2]):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert runs[True][0].finish_reason == "stop" and runs[True][0].token_ids == expected[:k]
    by_stop = runs[True][1]
    assert by_stop.finish_reason == "stop" and by_stop.text == cut and len(by_stop.token_ids) > j
    assert runs[True][2] == runs[False][2] == tok.decode(expected[:k])


# ------------------------------------------------------------------------------------------------- sampling
def test_sampling_with_seed_is_reproducible(model, tok, expected) -> None:
    kwargs = dict(max_new_tokens=N, temperature=1.0)
    a = generate_ids(model, tok, PROMPT, FULL, seed=123, **kwargs).token_ids
    b = generate_ids(model, tok, PROMPT, FULL, seed=123, **kwargs).token_ids
    assert a == b and len(a) > 3
    others = [generate_ids(model, tok, PROMPT, FULL, seed=s, **kwargs).token_ids for s in (1, 2, 3)]
    assert any(o != a for o in others)
    assert a != expected  # temperature 1 really samples
    streamed = "".join(stream_generate(model, tok, PROMPT, FULL, seed=123, **kwargs))
    assert streamed == tok.decode(a, skip_special_tokens=True)


def test_tiny_top_p_is_greedy(model, tok, expected) -> None:
    out = generate_ids(model, tok, PROMPT, FULL, max_new_tokens=N, temperature=1.0, top_p=1e-6, seed=0)
    assert out.token_ids == expected


def test_pick_nucleus() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    gen = torch.Generator().manual_seed(0)
    nucleus = {_pick(logits, 1.0, 0.5, gen) for _ in range(300)}
    assert nucleus == {0, 1}
    everything = {_pick(logits, 1.0, 1.0, gen) for _ in range(400)}
    assert everything == {0, 1, 2, 3}
    assert _pick(logits, 0.0, 0.1, gen) == 0
    assert _pick(torch.tensor([0.0, 5.0, 1.0]), 0.0, 1.0, None) == 1


# -------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(max_new_tokens=-1), r"max_new_tokens.*-1"),
    (dict(max_new_tokens=2.5), r"max_new_tokens.*2\.5"),
    (dict(temperature=-1.0), r"temperature.*-1"),
    (dict(top_p=0.0), r"top_p.*0"),
    (dict(top_p=1.5), r"top_p.*1\.5"),
    (dict(top_p=-0.2), r"top_p.*-0\.2"),
])
def test_bad_arguments_raise_value_error(model, tok, kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        generate(model, tok, PROMPT, FULL, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        generate_ids(model, tok, PROMPT, FULL, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        list(stream_generate(model, tok, PROMPT, FULL, **kwargs))
