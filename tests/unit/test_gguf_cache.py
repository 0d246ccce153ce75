"""``load_model(..., gguf_cache=)``: a GGUF file's converted copy is kept and read back instead of converting again.

The fast tests stand a tiny saved model in for transformers' GGUF conversion (``_convert_gguf``) and check the cache's
logic; the slow one converts the real Qwen2.5-Coder-0.5B file and checks that the cached copy is the same model and
tokenizer (weights bit for bit, token ids, chat template, KV-memory fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ltri_rag import load_model, loading
from ltri_rag.loading import gguf_cache_key
from tests.real_model import QWEN_GGUF
from tests.unit.tiny_models import VOCAB, reference_logits, tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A ``model.gguf`` whose "conversion" returns a tiny Llama and counts its calls (``calls``)."""
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake weights")
    calls: list[torch.dtype] = []

    def convert(source, gguf, dtype, extra):
        assert Path(source) / gguf == path
        calls.append(dtype)
        if getattr(convert, "fail", False):
            raise RuntimeError("conversion failed")
        return tiny_model("llama", seed=5).to(dtype), tiny_tokenizer()

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    monkeypatch.delenv(loading.GGUF_CACHE_ENV, raising=False)
    return path, calls, convert


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(2))
    return reference_logits(model, ids)


def test_a_second_load_reads_the_converted_copy(fake_gguf, tmp_path) -> None:
    path, calls, _ = fake_gguf
    cache = tmp_path / "cache"
    first, tok1 = load_model(path, device="cpu", gguf_cache=cache)
    second, tok2 = load_model(path, device="cpu", gguf_cache=cache)
    assert len(calls) == 1  # converted once
    assert not second.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(_logits(second), _logits(first), atol=0, rtol=0)
    text = "hello there, general"
    assert tok2(text)["input_ids"] == tok1(text)["input_ids"]
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [gguf_cache_key(path, torch.float32)]
    assert (entries[0] / "config.json").is_file() and (entries[0] / "ltri-converted.txt").is_file()


def test_a_new_dtype_or_a_changed_file_converts_again(fake_gguf, tmp_path) -> None:
    path, calls, _ = fake_gguf
    cache = tmp_path / "cache"
    load_model(path, device="cpu", gguf_cache=cache)
    model, _ = load_model(path, device="cpu", dtype="bf16", gguf_cache=cache)
    assert calls == [torch.float32, torch.bfloat16]
    assert next(model.parameters()).dtype == torch.bfloat16
    load_model(path, device="cpu", dtype="bf16", gguf_cache=cache)
    assert len(calls) == 2
    path.write_bytes(b"GGUF other weights, longer")  # replaced: a new size (and time)
    os.utime(path, ns=(1, 1))
    load_model(path, device="cpu", gguf_cache=cache)
    assert len(calls) == 3


def test_no_cache_unless_asked(fake_gguf, tmp_path, monkeypatch) -> None:
    path, calls, _ = fake_gguf
    load_model(path, device="cpu")
    load_model(path, device="cpu")
    assert len(calls) == 2 and not any(p.is_dir() for p in path.parent.iterdir())
    monkeypatch.setenv(loading.GGUF_CACHE_ENV, str(tmp_path / "env-cache"))
    load_model(path, device="cpu")
    load_model(path, device="cpu")
    assert len(calls) == 3 and (tmp_path / "env-cache").is_dir()
    monkeypatch.setenv(loading.GGUF_CACHE_ENV, "0")
    load_model(path, device="cpu")
    assert len(calls) == 4


def test_a_failed_or_interrupted_conversion_leaves_no_entry(fake_gguf, tmp_path) -> None:
    path, calls, convert = fake_gguf
    cache = tmp_path / "cache"
    convert.fail = True
    with pytest.raises(RuntimeError, match="conversion failed"):
        load_model(path, device="cpu", gguf_cache=cache)
    assert not any(p.is_dir() for p in cache.iterdir())
    # an entry without its completion mark (a process killed while writing) is converted again
    entry = cache / gguf_cache_key(path, torch.float32)
    entry.mkdir()
    (entry / "config.json").write_text("{broken")
    convert.fail = False
    model, _ = load_model(path, device="cpu", gguf_cache=cache)
    assert len(calls) == 2 and (entry / "ltri-converted.txt").is_file()
    again, _ = load_model(path, device="cpu", gguf_cache=cache)
    assert len(calls) == 2
    torch.testing.assert_close(_logits(again), _logits(model), atol=0, rtol=0)


def test_an_unusable_cache_still_loads(fake_gguf, tmp_path) -> None:
    path, calls, _ = fake_gguf
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    with pytest.warns(UserWarning, match="cannot use .*file-not-folder.* converting model.gguf without it"):
        model, _ = load_model(path, device="cpu", gguf_cache=blocked)  # a file where the folder should be
    assert len(calls) == 1 and blocked.read_text() == "x"
    torch.testing.assert_close(_logits(model), _logits(tiny_model("llama", seed=5)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="gguf_cache must be a folder path or None, got 3"):
        load_model(path, device="cpu", gguf_cache=3)  # type: ignore[arg-type]


def test_non_gguf_sources_ignore_the_cache(tmp_path) -> None:
    saved = tmp_path / "tiny"
    tiny_model("llama", seed=3).save_pretrained(saved)
    tiny_tokenizer().save_pretrained(saved)
    load_model(saved, device="cpu", gguf_cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.skipif(not QWEN_GGUF.is_file() and not os.environ.get("CI"), reason=f"model file {QWEN_GGUF} not fetched")
def test_real_gguf_cached_copy_is_the_same_model(tmp_path) -> None:
    from ltri_rag import LtriConfig
    from ltri_rag.memory_fingerprint import memory_fingerprint

    cache = tmp_path / "cache"
    converted, tok_a = load_model(QWEN_GGUF, dtype="float32", device="cpu", gguf_cache=cache)
    cached, tok_b = load_model(QWEN_GGUF, dtype="float32", device="cpu", gguf_cache=cache)
    a, b = converted.state_dict(), cached.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    texts = ["Hello, world!", "def f(x):\n    return x ** 2  # café, naïve, 東京", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok_b(text)["input_ids"] == tok_a(text)["input_ids"], text
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert (tok_b.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == tok_a.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert tok_b.eos_token_id == tok_a.eos_token_id and len(tok_b) == len(tok_a)
    sink = torch.arange(4)
    config = LtriConfig()
    assert memory_fingerprint(cached, tok_b, config, sink) == memory_fingerprint(converted, tok_a, config, sink)
