"""The models under test: the built-in random-weight ones (Llama-3-8B, Qwen2.5-0.5B and a tiny Llama shape),
drawn on the device, or a real one loaded with ``ltri_rag.load_model``; and the shape numbers their floors need."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ltri_rag
from benchmarks.e2e.device import sync

# Random-weight models: family and config fields, the shapes of the public checkpoints.
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b-random": ("llama", {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False}),
    "qwen2.5-0.5b-random": ("qwen2", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True}),
    "tiny-llama-random": ("llama", {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": False}),
}


@dataclass
class ModelInfo:
    """A model under test and the numbers its floors need."""

    name: str
    model: nn.Module
    source: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_params: int  # parameters of the decoder layers (the per-token matmul work)
    weight_bytes: int  # bytes a decode step reads: every parameter but the input embedding (unless tied)
    build_seconds: float

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        elem = next(self.model.parameters()).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def describe(self) -> dict[str, Any]:
        """JSON-able shape summary."""
        return {"name": self.name, "source": self.source, "layers": self.num_layers, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab": self.vocab_size,
                "layer_params": self.layer_params, "weight_bytes": self.weight_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "build_seconds": round(self.build_seconds, 2),
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}


def _config_for(family: str, fields: dict[str, Any], max_positions: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    fields = dict(fields)
    theta = fields.pop("rope_theta")
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        fields["rope_theta"] = theta
    return cls(**fields, max_position_embeddings=max_positions, attn_implementation="sdpa")


def build_random_model(name: str, device: torch.device, dtype: torch.dtype, seed: int, max_positions: int
                       ) -> nn.Module:
    """A built-in random-weight model, allocated directly on ``device`` in ``dtype`` (no float32 host copy).

    Weights are drawn from ``N(0, initializer_range)`` by a generator seeded with ``seed`` on the device; norm
    weights are 1, biases 0.

    Raises:
        ValueError: for a name not in :data:`BUILTIN_MODELS`.
    """
    from transformers import AutoModelForCausalLM

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; use one of {sorted(BUILTIN_MODELS)} or NAME=PATH")
    family, fields = BUILTIN_MODELS[name]
    config = _config_for(family, fields, max_positions)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in pname else 0.0)
            else:
                param.normal_(0.0, std, generator=gen)
    return model.eval()


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> nn.Module | None:
    """The decoder layers of ``model`` (``model.get_decoder().layers``), or None where it has no such list."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return getattr(decoder, "layers", None)


def describe_model(name: str, model: nn.Module, source: str, build_seconds: float) -> ModelInfo:
    """Shape numbers of ``model`` (heads, layers, parameter counts, bytes a decode step reads)."""
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = embed.weight.numel() * embed.weight.element_size()
    weight_bytes = total if tied else total - embed_bytes
    layers = decoder_layers(model)
    layer_params = sum(p.numel() for p in layers.parameters()) if layers is not None else \
        sum(p.numel() for p in model.parameters()) - embed.weight.numel()
    return ModelInfo(name=name, model=model, source=source, num_layers=config.num_hidden_layers, num_heads=heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     vocab_size=embed.weight.shape[0], layer_params=layer_params, weight_bytes=weight_bytes,
                     build_seconds=build_seconds)


def load_model_info(spec: str, device: torch.device, dtype: torch.dtype, seed: int, max_positions: int
                    ) -> ModelInfo:
    """Build (a built-in random model) or load (``NAME=PATH``) one ``--model`` on ``device``."""
    began = time.perf_counter()
    name, sep, path = spec.partition("=")
    if sep:
        model, _ = ltri_rag.load_model(path, dtype=dtype, device=device)
        source = path
    else:
        model = build_random_model(spec, device, dtype, seed, max_positions)
        source = "random weights"
    sync(device)
    return describe_model(name, model, source, time.perf_counter() - began)


def check_model_spec(spec: str) -> str | None:
    """Why ``spec`` is not a usable ``--model`` value, or None."""
    name, sep, path = spec.partition("=")
    if sep:
        return None if name and path else f"--model {spec!r}: NAME=PATH needs both a name and a path"
    if spec not in BUILTIN_MODELS:
        return f"unknown model {spec!r}: use one of {sorted(BUILTIN_MODELS)} or NAME=PATH (a real model)"
    return None
