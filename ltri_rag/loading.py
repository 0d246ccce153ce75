"""Loading a model and tokenizer from a Hugging Face Hub id, a local directory, or a ``.gguf`` file."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["GGUF_CACHE_ENV", "check_tokenizer", "gguf_cache_key", "load_model", "resolve_device", "resolve_dtype"]

GGUF_CACHE_ENV = "LTRI_GGUF_CACHE"  # default ``gguf_cache`` of load_model: a folder ("" or "0": none)
_COMPLETE = "ltri-converted.txt"  # written last into a cache entry: an entry without it is ignored

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
    """``auto``/None -> bfloat16 on a CUDA device with bfloat16 hardware (compute capability 8.0 or later), float16
    on an older one (Volta, Turing: bfloat16 there is emulated, far slower), float32 elsewhere; names like
    ``"bf16"`` accepted."""
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.bfloat16 if torch.cuda.get_device_capability(index) >= (8, 0) else torch.float16
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


def gguf_cache_key(path: Path, dtype: torch.dtype) -> str:
    """The cache entry name of GGUF file ``path`` loaded as ``dtype``: its name, a digest of its resolved path, size
    and modification time (a replaced file gets a new entry), and the dtype."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}-{str(dtype).removeprefix('torch.')}"


def _resolve_gguf_cache(gguf_cache: str | Path | None) -> Path | None:
    if gguf_cache is None:
        gguf_cache = os.environ.get(GGUF_CACHE_ENV, "")
        if gguf_cache.strip() in ("", "0"):
            return None
    if not isinstance(gguf_cache, (str, Path)) or not str(gguf_cache):
        raise ValueError(f"gguf_cache must be a folder path or None, got {gguf_cache!r}")
    return Path(gguf_cache).expanduser()


@contextmanager
def _locked(folder: Path, name: str) -> Any:
    """An exclusive lock on ``folder/name.lock`` (POSIX ``flock``; no lock where that is missing), so that two
    processes loading the same file convert it once (``folder`` exists)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: at worst both convert, and one rename wins
        yield
        return
    with open(folder / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(source: str, gguf: str, dtype: torch.dtype, extra: dict[str, Any]) -> tuple[nn.Module, Any]:
    """De-quantise GGUF ``source/gguf`` with transformers (slow: Python-side de-quantisation and tokenizer
    conversion) and check the converted tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise ImportError('loading GGUF weights needs the gguf package: pip install "ltri-rag[gguf]"') from err
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf, **extra)
    check_tokenizer(tokenizer, gguf)  # rebuilt from GGUF metadata by transformers: check the conversion
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=dtype, attn_implementation="sdpa",
                                                 **extra)
    return model, tokenizer


def _save_converted(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a GGUF-converted model as a plain checkpoint: config (without the GGUF quantization note, the weights
    being de-quantised already), weights in safetensors (shared tensors once), generation config, tokenizer.
    (``save_pretrained`` refuses models loaded from GGUF.)"""
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    model.config.__class__.from_dict(config).save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _load_gguf(source: str, gguf: str, dtype: torch.dtype, cache: Path | None,
               extra: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A GGUF model and tokenizer: converted, or read from the cache entry of an earlier conversion (then kept
    there as safetensors + tokenizer files, written to a temporary folder and renamed into place whole)."""
    if cache is None:
        return _convert_gguf(source, gguf, dtype, extra)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = gguf_cache_key(Path(source) / gguf, dtype)
    entry = cache / key
    try:  # a cache that cannot be written (a file in the way, no permission) is skipped, with a warning
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{key}.lock").touch()
    except OSError as err:
        warnings.warn(f"cannot use {cache} to keep converted GGUF models ({err}); converting {gguf} without it",
                      stacklevel=3)
        return _convert_gguf(source, gguf, dtype, extra)
    with _locked(cache, key):
        if not (entry / _COMPLETE).is_file():
            model, tokenizer = _convert_gguf(source, gguf, dtype, extra)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
            try:
                _save_converted(model, tokenizer, staging)
                (staging / _COMPLETE).write_text(f"{Path(source) / gguf}\n", encoding="utf-8")
                shutil.rmtree(entry, ignore_errors=True)  # an entry left incomplete by a killed process
                staging.rename(entry)
                log.info("converted %s into %s", gguf, entry)
            except (OSError, ValueError, RuntimeError) as err:  # a full disk, a read-only cache: loaded all the same
                shutil.rmtree(staging, ignore_errors=True)
                warnings.warn(f"could not keep the converted {gguf} in {cache}: {err}", stacklevel=3)
            return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(entry)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, attn_implementation="sdpa")
    log.info("loaded %s from its converted copy %s", gguf, entry)
    return model, tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    gguf_file: str | None = None,
    gguf_cache: str | Path | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, ready for :func:`ltri_rag.generate`.

    Args:
        name_or_path: Hub id (``"Qwen/Qwen2.5-0.5B-Instruct"``), local model directory, a ``.gguf`` file, or a
            directory holding exactly one ``.gguf`` file (GGUF weights are de-quantised by transformers; needs the
            ``gguf`` package: ``pip install "ltri-rag[gguf]"``).
        dtype: ``auto`` (bfloat16 on CUDA, float16 on GPUs older than compute capability 8.0, float32 on CPU),
            a name, or a ``torch.dtype``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        gguf_file: GGUF file name inside ``name_or_path``.
        gguf_cache: A folder where a GGUF file's de-quantised weights (in ``dtype``) and converted tokenizer are kept
            after its first load, so that later loads skip the conversion (Qwen2.5-Coder-0.5B on a CPU: ~80 s ->
            a few s). An entry is keyed by the file's path, size and modification time and by ``dtype``. ``None``:
            ``$LTRI_GGUF_CACHE`` if set (``0``: none), else no cache. Ignored for non-GGUF sources.
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
    cache = _resolve_gguf_cache(gguf_cache)
    if gguf is not None:
        model, tokenizer = _load_gguf(source, gguf, torch_dtype, cache, extra)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa", **extra)
    model = model.to(dev).eval()
    log.info("loaded %s (%s) on %s as %s", source, gguf or "weights", dev, torch_dtype)
    return model, tokenizer
