"""Moving rotary-encoded vectors to other positions: ``RoPE(x, p') = R(p' - p) RoPE(x, p)``.

Hugging Face's "rotate-half" layout is assumed (Llama, Qwen2, Mistral, Gemma 3 all use it): dimension ``i`` pairs
with ``i + rot_dim / 2``. Models with partial rotary embeddings rotate only the first ``rot_dim`` dimensions.
"""

from __future__ import annotations

import torch
from torch import nn

from ltri_rag.kernels.transfer import to_device

__all__ = ["rotate", "find_inv_freq"]


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate rotary-encoded vectors by ``delta`` positions.

    Args:
        x: ``[..., seq_len, head_dim]`` vectors already carrying RoPE at some position.
        delta: ``[..., seq_len]`` (broadcastable to ``x.shape[:-1]``) integer position shifts, on any device (a host
            tensor is copied to ``x``'s device asynchronously, see :func:`ltri_rag.kernels.transfer.to_device`).
        inv_freq: ``[rot_dim / 2]`` inverse frequencies of the layer's rotary embedding.

    Returns:
        ``x`` rotated, same shape and dtype. Angles are computed in float64, so large positions stay exact.
    """
    half = inv_freq.numel()
    rot_dim = 2 * half
    if rot_dim > x.shape[-1]:
        raise ValueError(f"rotary dim {rot_dim} exceeds head_dim {x.shape[-1]}")
    # a host ``delta`` goes over without a device sync (callers build positions on the host)
    angles = to_device(delta, x.device, torch.float64).unsqueeze(-1) \
        * to_device(inv_freq, x.device, torch.float64)  # [..., L, half]
    cos = torch.cos(angles).to(torch.float32)
    sin = torch.sin(angles).to(torch.float32)
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rot_dim], xf[..., rot_dim:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    return torch.cat([y1, y2, rest], dim=-1).to(x.dtype)


def _rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]


def find_inv_freq(model: nn.Module, layer_idx: int) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding used by global-attention layer ``layer_idx``.

    Handles one shared rotary module (``inv_freq``), per-layer-type buffers (``full_attention_inv_freq``, as in
    Gemma 3 on recent transformers) and separate global/local modules (``rotary_emb`` / ``rotary_emb_local``).

    Raises:
        ValueError: if the model has no recognisable rotary embedding.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None)
    layer_type = layer_types[layer_idx] if layer_types else "full_attention"
    modules = _rotary_modules(model)
    for _, module in modules:
        buf = getattr(module, f"{layer_type}_inv_freq", None)
        if isinstance(buf, torch.Tensor):
            return buf.detach()
    globals_first = sorted(modules, key=lambda item: "local" in item[0].lower())
    for _, module in globals_first:
        buf = getattr(module, "inv_freq", None)
        if isinstance(buf, torch.Tensor):
            return buf.detach()
    raise ValueError(f"no rotary embedding with inv_freq found in {type(model).__name__}")
