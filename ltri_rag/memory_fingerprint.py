"""What a :class:`~ltri_rag.memory.KVMemory` store must agree on with the model opening it: its fingerprint.

A store keeps K/V, spans and index vectors computed by one model, read through one tokenizer, after one sink prefix,
under one engine configuration. Any of these changing makes the stored tensors wrong for the opener, so each is
summarised in the store's :class:`~ltri_rag.store.Fingerprint` and compared on open (every differing key is named):

* shapes: ``num_layers``, ``num_kv_heads``, ``head_dim``, ``dtype`` (the K/V dtype, the model's);
* model: ``model.class``, ``model.type``, ``model.hidden_size``, ``model.vocab_size``, ``model.architecture_sha256``
  (the config keys that shape the network) and ``model.weights_sha256`` with ``model.weights_version`` (every value
  of every parameter, rounded to bfloat16 so that loading the same weights in float32 or bfloat16 differs only in
  ``dtype``; see :func:`weights_sha256`). The path the model was loaded from is not part of the identity (moving a
  checkpoint must not orphan its stores);
* tokenizer: ``tokenizer.vocab_size`` and ``tokenizer.sha256`` (vocabulary, special token ids, encodings of a probe);
* ``sink.sha256``: the sink prefix's token ids (see :func:`~ltri_rag.memory_ingest.sink_prefix_ids`);
* ``config.<field>`` for every :class:`~ltri_rag.config.LtriConfig` field that changes what ingest stores (all but
  :data:`RUNTIME_FIELDS`, which only affect speed, placement or decoding).
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from typing import Any

import torch
from torch import nn

from ltri_rag.cache import layer_sliding_windows
from ltri_rag.config import LtriConfig
from ltri_rag.store import Fingerprint, JsonScalar

__all__ = ["FORMAT_VERSION", "RUNTIME_FIELDS", "WEIGHTS_VERSION", "config_from_fingerprint", "memory_fingerprint",
           "model_shapes", "stored_weights_version", "tokenizer_sha256", "weights_sha256"]

FORMAT_VERSION = 1
WEIGHTS_VERSION = 2
"""The :func:`weights_sha256` scheme new stores are written with. 1 (stores written before it; their fingerprints
have no ``model.weights_version`` key) hashed 256 sampled values per parameter, and missed a change anywhere
else, such as one retrained embedding row. Stores of either version open; each is compared under its own."""
RUNTIME_FIELDS = ("kv_offload", "kv_device_gib", "attention_backend", "pin_prompt_spans", "pin_extra_budget",
                  "full_chunk_size", "page_size", "decode_retrieval_stride", "selection_on_device", "decode_graph",
                  "decode_graph_retrieval", "zero_copy_host_pages", "host_cache_tokens")
# Fields added to LtriConfig after stores were first written, with the value a store without the key was ingested
# with: a fingerprint leaves such a field out at that value (so old stores still match), and reading a config back
# from a fingerprint without the key gives that value.
_ADDED_FIELDS: dict[str, Any] = {"score_queries": None, "mass_queries": None}
_ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                      "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
                      "use_sliding_window", "layer_types", "attention_bias", "tie_word_embeddings",
                      "query_pre_attn_scalar", "partial_rotary_factor")
_PROBE = "KV memory probe: Hello, world! 12345 3.14 naïve café 東京 😀\n\ttabs  and   spaces"
_SAMPLES_PER_PARAMETER = 256  # version 1
_BLOCK = 4096  # version 2: values per block signature
_CHUNK = 1 << 18  # version 2: values converted at a time on the host (2 MiB of float64, cache-sized: 2.4x faster
_CUDA_CHUNK = 1 << 24  # than 64 MiB on a 2-core CPU) and on a GPU (128 MiB, few launches)
_WEIGHTS_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[tuple[Any, ...], str]]] = \
    weakref.WeakKeyDictionary()
_WEIGHTS_CACHE_LOCK = threading.Lock()


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def model_shapes(model: nn.Module) -> tuple[int, int, int, torch.dtype]:
    """``(num_layers, num_kv_heads, head_dim, kv dtype)`` of a Hugging Face causal LM."""
    cfg = _text_config(model)
    num_heads = int(cfg.num_attention_heads)
    num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads)
    return int(cfg.num_hidden_layers), num_kv_heads, head_dim, next(model.parameters()).dtype


def _block_signatures(flat: torch.Tensor) -> bytes:
    """Version 2's signature of one parameter: ``[ceil(n / 4096), 2]`` int64, per block of 4,096 consecutive values
    (their bfloat16 bit patterns as integers ``b_i``) ``sum(b_i)`` and ``sum((i + 1) * b_i)``.

    Every sum is an integer below 2**40, so the float64 matrix product computing it is exact in any summation order:
    the bytes are the same on any device. A changed value changes both sums; two swapped values change the second.
    """
    # float64 where the device has it (CUDA, CPU); elsewhere (e.g. MPS) the chunks are summed on the host
    device = flat.device if flat.device.type in ("cpu", "cuda") else torch.device("cpu")
    weights = torch.stack((torch.ones(_BLOCK, dtype=torch.float64, device=device),
                           torch.arange(1, _BLOCK + 1, dtype=torch.float64, device=device)), dim=1)  # [B, 2]
    parts = []
    chunk = _CUDA_CHUNK if device.type == "cuda" else _CHUNK  # multiples of _BLOCK: no block straddles two chunks
    for start in range(0, flat.numel(), chunk):
        bits = flat[start:start + chunk].to(torch.bfloat16).view(torch.int16).to(device, torch.float64)
        whole = bits.numel() // _BLOCK * _BLOCK
        if whole:
            parts.append(bits[:whole].view(-1, _BLOCK) @ weights)
        if whole < bits.numel():
            tail = bits[whole:]
            parts.append((tail @ weights[:tail.numel()]).view(1, 2))
    if not parts:
        return b""
    return torch.cat(parts).to(torch.int64).cpu().numpy().tobytes()


def _weights_digest(model: nn.Module, version: int) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(f"{name}:{tuple(param.shape)}:".encode())
            if version == 1:
                step = max(1, flat.numel() // _SAMPLES_PER_PARAMETER)
                sample = flat[::step][:_SAMPLES_PER_PARAMETER].to("cpu", torch.float32).to(torch.bfloat16)
                digest.update(sample.view(torch.int16).numpy().tobytes())
            else:
                digest.update(_block_signatures(flat))
    return digest.hexdigest()


def weights_sha256(model: nn.Module, version: int = WEIGHTS_VERSION) -> str:
    """sha256 over every parameter's name, shape and values, rounded to bfloat16 (loading the same weights in float32
    or bfloat16 gives the same hash).

    Version 2 (the default) covers every value through :func:`_block_signatures` (about 1 s per billion float32
    parameters on a 2-core CPU; the hashing of the signatures, 4 bytes per 1,024 values, runs on the host).
    Version 1 hashed 256 evenly spaced values per parameter; it is kept to open stores written with it. The result
    is cached per model object and recomputed when a parameter is replaced or changed in place (torch's version
    counters).

    Raises:
        ValueError: ``version`` is not 1 or 2.
    """
    if version not in (1, 2):
        raise ValueError(f"weights fingerprint version must be 1 or 2, got {version!r} (a store written by a newer "
                         f"ltri-rag?)")
    state = tuple((name, p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                  for name, p in model.named_parameters())
    with _WEIGHTS_CACHE_LOCK:
        known = _WEIGHTS_CACHE.get(model, {}).get(version)
    if known is not None and known[0] == state:
        return known[1]
    digest = _weights_digest(model, version)
    with _WEIGHTS_CACHE_LOCK:
        _WEIGHTS_CACHE.setdefault(model, {})[version] = (state, digest)
    return digest


def stored_weights_version(fingerprint: Fingerprint) -> int:
    """The :func:`weights_sha256` version a store's fingerprint was written with (1 when it names none).

    Raises:
        ValueError: the version is not one this code computes.
    """
    version = fingerprint.get("model.weights_version", 1)
    if version not in (1, 2):
        raise ValueError(f"the store's weights fingerprint has version {version!r}; this ltri-rag computes 1 and 2 "
                         f"(was it written by a newer one?)")
    return int(version)  # type: ignore[arg-type]


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 over the vocabulary, the special token ids and the encoding of a fixed probe string."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    probe = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    return _sha256_json({"vocab": vocab, "specials": specials, "probe": probe})


def memory_fingerprint(model: nn.Module, tokenizer: Any, config: LtriConfig, sink_ids: torch.Tensor,
                       weights_version: int = WEIGHTS_VERSION) -> Fingerprint:
    """The fingerprint a store for ``model`` + ``tokenizer`` + ``config`` must carry (see the module docstring).

    Args:
        model: Hugging Face causal LM.
        tokenizer: Its tokenizer.
        config: Engine configuration used to ingest (mode ``ltri`` or ``infllm``).
        sink_ids: ``[num_sink_tokens]`` int64 ids of the sink prefix.
        weights_version: :func:`weights_sha256` version; 1 gives the fingerprint of stores written before version
            2 (no ``model.weights_version`` key), to compare with such a store.
    """
    num_layers, num_kv_heads, head_dim, dtype = model_shapes(model)
    cfg = _text_config(model)
    arch = {key: getattr(cfg, key, None) for key in _ARCHITECTURE_KEYS}
    items: dict[str, JsonScalar] = {
        "kvmemory.format": FORMAT_VERSION,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "model.class": type(model).__name__,
        "model.type": str(getattr(cfg, "model_type", "")),
        "model.hidden_size": int(cfg.hidden_size),
        "model.vocab_size": int(cfg.vocab_size),
        "model.global_layers": ",".join(str(i) for i, w in enumerate(layer_sliding_windows(model)) if w is None),
        "model.architecture_sha256": _sha256_json(arch),
        "model.weights_sha256": weights_sha256(model, weights_version),
        "tokenizer.vocab_size": len(tokenizer),
        "tokenizer.sha256": tokenizer_sha256(tokenizer),
        "sink.sha256": _sha256_json([int(i) for i in sink_ids.tolist()]),
    }
    if weights_version != 1:
        items["model.weights_version"] = weights_version
    for name, value in config.to_dict().items():
        if name in RUNTIME_FIELDS or (name in _ADDED_FIELDS and value == _ADDED_FIELDS[name]):
            continue
        items[f"config.{name}"] = value
    return Fingerprint(items)


def config_from_fingerprint(fingerprint: Fingerprint) -> LtriConfig:
    """The :class:`LtriConfig` a store was ingested with (runtime fields at their defaults).

    Raises:
        ValueError: the fingerprint was not written by a KV memory (no ``config.*`` keys).
    """
    fields = {key.removeprefix("config."): value for key, value in fingerprint.items() if key.startswith("config.")}
    if not fields:
        raise ValueError(f"the store's fingerprint holds no engine config (keys {sorted(fingerprint)}); was it "
                         "written by KVMemory?")
    for name, legacy in _ADDED_FIELDS.items():
        fields.setdefault(name, legacy)
    return LtriConfig.from_dict(fields)
