"""``resolve_device``, ``resolve_dtype`` and ``load_model`` (local directories and GGUF path handling, offline)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from ltri_rag import load_model
from ltri_rag.loading import _split_gguf, resolve_device, resolve_dtype
from tests.unit.tiny_models import VOCAB, reference_logits, tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

AUTO_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("auto", [None, "auto"])
def test_resolve_device_auto(auto) -> None:
    assert resolve_device(auto) == torch.device(AUTO_DEVICE)


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # a name only: no CUDA needed to resolve it


@pytest.mark.parametrize("bad", ["gpu0", "tpu", "cuda:x", ""])
def test_resolve_device_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match=f"unknown device {bad!r}"):
        resolve_device(bad)


# --------------------------------------------------------------------------------------------------- dtypes
def test_resolve_dtype_auto(monkeypatch) -> None:
    """``auto``: float32 on the CPU; on CUDA bfloat16 from compute capability 8.0 (Ampere), float16 before it
    (Volta, Turing: no bfloat16 hardware). The capability is asked of the named device, or the current one."""
    if AUTO_DEVICE == "cuda":
        expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
        assert resolve_dtype("auto", resolve_device("auto")) == expected
    else:
        assert resolve_dtype("auto", resolve_device("auto")) == torch.float32
    asked = []

    def capability(index):
        asked.append(index)
        return current

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for current, expected in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                              ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)):
        for auto in (None, "auto"):
            assert resolve_dtype(auto, torch.device("cpu")) == torch.float32
            assert resolve_dtype(auto, torch.device("cuda")) == expected, current
            assert resolve_dtype(auto, torch.device("cuda", 1)) == expected, current
    assert set(asked) == {1, 3}


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("fp16", torch.float16), ("float16", torch.float16),
                                        ("fp32", torch.float32), ("float32", torch.float32)])
def test_resolve_dtype_names(name: str, dtype: torch.dtype) -> None:
    assert resolve_dtype(name, torch.device("cpu")) == dtype
    assert resolve_dtype(name, torch.device("cuda")) == dtype


def test_resolve_dtype_passes_torch_dtypes() -> None:
    assert resolve_dtype(torch.float64, torch.device("cpu")) == torch.float64
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("bad", ["int8", "BF16 ", "half-precision", "f32"])
def test_resolve_dtype_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match=f"unknown dtype {bad!r}"):
        resolve_dtype(bad, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- load_model
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", seed=3)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


def test_load_model_from_a_local_directory(saved) -> None:
    path, original = saved
    model, tok = load_model(str(path), device="auto", dtype="auto")
    assert not model.training
    param = next(model.parameters())
    assert param.device == torch.device(AUTO_DEVICE)
    assert param.dtype == (torch.bfloat16 if AUTO_DEVICE == "cuda" else torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(0))
    if AUTO_DEVICE == "cpu":
        torch.testing.assert_close(reference_logits(model, ids), reference_logits(original, ids), atol=1e-5, rtol=0)
    # the tokenizer saved beside it comes back, chat template included
    reference = tiny_tokenizer()
    assert tok("hello there")["input_ids"] == reference("hello there")["input_ids"]
    assert tok.eos_token_id == reference.eos_token_id
    msgs = [{"role": "user", "content": "hi"}]
    assert (tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


def test_load_model_accepts_a_path_and_a_dtype(saved) -> None:
    path, original = saved
    model, _ = load_model(path, device="cpu", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training and next(model.parameters()).device == torch.device("cpu")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(original, ids)
    assert (reference_logits(model, ids).float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_load_model_rejects_bad_arguments(saved) -> None:
    path, _ = saved
    with pytest.raises(ValueError, match="name_or_path"):
        load_model("")
    with pytest.raises(ValueError, match="name_or_path"):
        load_model(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        load_model(str(path), dtype="int4")
    with pytest.raises(ValueError, match="unknown device 'gpu7'"):
        load_model(str(path), device="gpu7")


# ----------------------------------------------------------------------------------------------------- GGUF
def test_missing_gguf_file(tmp_path: Path) -> None:
    missing = tmp_path / "model.Q4_K_M.gguf"
    with pytest.raises(FileNotFoundError, match="model.Q4_K_M.gguf"):
        load_model(str(missing))
    (tmp_path / "a_dir.gguf").mkdir()  # a directory named like a GGUF file is not a file
    with pytest.raises(FileNotFoundError, match="a_dir.gguf"):
        load_model(str(tmp_path / "a_dir.gguf"))


def test_directory_with_several_gguf_files(tmp_path: Path) -> None:
    (tmp_path / "b.Q8_0.gguf").write_bytes(b"")
    (tmp_path / "a.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files") as err:
        load_model(str(tmp_path))
    assert "a.Q4_0.gguf" in str(err.value) and "b.Q8_0.gguf" in str(err.value)
    assert "gguf_file" in str(err.value)  # says how to choose


def test_split_gguf(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"")
    assert _split_gguf(str(one), None) == (str(one), "m.gguf")
    assert _split_gguf(str(one / "m.gguf"), None) == (str(one), "m.gguf")
    # an explicit gguf_file is kept
    assert _split_gguf(str(one), "other.gguf") == (str(one), "other.gguf")
    # several files, one chosen explicitly: no error
    (one / "n.gguf").write_bytes(b"")
    assert _split_gguf(str(one), "n.gguf") == (str(one), "n.gguf")
    # a model directory (config.json) is not read as GGUF even with .gguf files beside it
    (one / "config.json").write_text("{}")
    assert _split_gguf(str(one), None) == (str(one), None)
    # hub ids and directories without GGUF files pass through
    assert _split_gguf("Qwen/Qwen2.5-0.5B-Instruct", None) == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _split_gguf(str(empty), None) == (str(empty), None)


def test_check_tokenizer_warns_on_a_broken_conversion() -> None:
    from ltri_rag.loading import check_tokenizer

    def pieces(text: str, add_special_tokens: bool = False) -> dict:  # 2-letter pieces, like a merge-less BPE
        return {"input_ids": [0] * sum(-(-len(w) // 2) for w in text.split())}

    def words(text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [0] * len(text.split())}

    with pytest.warns(UserWarning, match="tokens per word"):
        assert check_tokenizer(pieces, "broken.gguf") > 1.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tokenizer(words, "fine.gguf") == 1.0
