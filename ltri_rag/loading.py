"""Loading a model and tokenizer from a Hugging Face Hub id, a local directory, or a ``.gguf`` file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["check_tokenizer", "load_model", "resolve_device", "resolve_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}") from err


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None -> bfloat16 on CUDA, float32 elsewhere; names like ``"bf16"`` accepted."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


_PROBE = "Below are a number of documents about the history of the world and the people who made it."


def check_tokenizer(tokenizer: Any, source: str, max_tokens_per_word: float = 1.6) -> float:
    """Warn when ``tokenizer`` cuts plain English into far more pieces than any real vocabulary does.

    A GGUF tokenizer that a transformers version converts wrongly (seen: Gemma 3 under transformers 5.17, which lost
    the merges and split "Below" into "Be", "low") still loads and runs, and the model then answers garbage with no
    error anywhere. Common English words are single tokens in every vocabulary of 32K entries or more, so about 1.1-1.3
    tokens per word is normal.

    Args:
        tokenizer: The loaded tokenizer.
        source: What it was loaded from (for the message).
        max_tokens_per_word: Warning threshold.

    Returns:
        Tokens per word on a fixed English sentence.
    """
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    ratio = len(ids) / len(_PROBE.split())
    if ratio > max_tokens_per_word:
        import transformers

        warnings.warn(f"the tokenizer of {source} splits plain English into {ratio:.1f} tokens per word (normal: about "
                      f"1.2): it was probably converted wrongly by transformers {transformers.__version__} "
                      "(Gemma 3 GGUF files need transformers >= 5.24); answers will be garbage", stacklevel=3)
    return ratio


def _split_gguf(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None]:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if gguf_file is None and path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return str(path), found[0].name
        if len(found) > 1:
            raise ValueError(f"{path} holds several GGUF files {[f.name for f in found]}; pass gguf_file=")
    return name_or_path, gguf_file


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    gguf_file: str | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, ready for :func:`ltri_rag.generate`.

    Args:
        name_or_path: Hub id (``"Qwen/Qwen2.5-0.5B-Instruct"``), local model directory, a ``.gguf`` file, or a
            directory holding exactly one ``.gguf`` file (GGUF weights are de-quantised by transformers; needs the
            ``gguf`` package: ``pip install "ltri-rag[gguf]"``).
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), a name, or a ``torch.dtype``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        gguf_file: GGUF file name inside ``name_or_path``.
        **from_pretrained_kwargs: Passed to ``from_pretrained`` (e.g. ``revision``, ``trust_remote_code``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    source, gguf = _split_gguf(str(name_or_path), gguf_file)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    extra = dict(from_pretrained_kwargs)
    if gguf is not None:
        try:
            import gguf as _gguf  # noqa: F401
        except ImportError as err:
            raise ImportError('loading GGUF weights needs the gguf package: pip install "ltri-rag[gguf]"') from err
        extra["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    if gguf is not None:  # the tokenizer was rebuilt from GGUF metadata by transformers: check the conversion
        check_tokenizer(tokenizer, gguf)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa", **extra)
    model = model.to(dev).eval()
    log.info("loaded %s (%s) on %s as %s", source, gguf or "weights", dev, torch_dtype)
    return model, tokenizer
