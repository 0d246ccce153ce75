"""Moving rotary-encoded vectors to other positions: ``RoPE(x, p') = R(p' - p) RoPE(x, p)``.

Hugging Face's "rotate-half" layout is assumed (Llama, Qwen2, Mistral, Gemma 3 all use it): dimension ``i`` pairs
with ``i + rot_dim / 2``. Models with partial rotary embeddings rotate only the first ``rot_dim`` dimensions.
"""

from __future__ import annotations

import torch
from torch import nn

from ltri_rag.kernels.transfer import to_device

__all__ = ["find_inv_freq", "rotate"]


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Rotate rotary-encoded vectors by ``delta`` positions.

    Args:
        x: ``[..., seq_len, head_dim]`` vectors already carrying RoPE at some position.
        delta: ``[..., seq_len]`` (broadcastable to ``x.shape[:-1]``) integer position shifts, on any device (a host
            tensor is copied to ``x``'s device asynchronously, see :func:`ltri_rag.kernels.transfer.to_device`).
        inv_freq: ``[rot_dim / 2]`` inverse frequencies of the layer's rotary embedding.
        backend: ``torch`` (this module's few torch operations), ``triton`` (one launch of
            :func:`ltri_rag.kernels.triton_rope.gather_rotate_triton`) or ``auto`` (Triton on CUDA when triton
            imports, torch elsewhere): the engine passes ``LtriConfig.attention_backend``. Both compute the angles
            and their cosine and sine in float64.

    Returns:
        ``x`` rotated, same shape and dtype (contiguous on the Triton path). Angles are computed in float64, so
        large positions stay exact.
    """
    if _triton_rotates(backend, x.device):
        return _rotate_triton(x, delta, inv_freq)
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
    x1, x2 = xf[..., :half], xf[..., half:rot_dim]
    # written into one output in place (four elementwise passes instead of six and a concatenation): the same
    # products and sums in the same order, so the same bits
    out = torch.empty(torch.broadcast_shapes(xf.shape, (*cos.shape[:-1], xf.shape[-1])), dtype=torch.float32,
                      device=xf.device)
    y1, y2 = out[..., :half], out[..., half:rot_dim]
    torch.mul(x1, cos, out=y1).sub_(x2 * sin)
    torch.mul(x2, cos, out=y2).add_(x1 * sin)
    if rot_dim < x.shape[-1]:
        out[..., rot_dim:] = xf[..., rot_dim:]
    return out.to(x.dtype)


def _triton_rotates(backend: str, device: torch.device) -> bool:
    """Whether :func:`rotate` takes the Triton kernel for ``backend`` on ``device`` (where the attention does)."""
    from ltri_rag.kernels.attention import local_attention, local_attention_backend

    return local_attention_backend(backend, device) is not local_attention


def _rotate_triton(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` in one Triton launch: a shift per row, or a pattern of ``seq_len`` shifts repeated over the
    leading dimensions (no broadcast copy)."""
    from ltri_rag.kernels.triton_rope import gather_rotate_triton

    if inv_freq.numel() == 0 or x.numel() == 0:
        return x.contiguous()
    lead = x.shape[:-1]
    pattern = delta.dim() >= 1 and delta.numel() == lead[-1] == delta.shape[-1]  # one shift per position
    if not pattern and tuple(delta.shape) != tuple(lead):
        delta = delta.expand(lead)  # a general broadcast: one shift per row
    delta = to_device(delta.reshape(-1), x.device, torch.int64)
    out, _ = gather_rotate_triton(x.contiguous(), None, None, delta, inv_freq)
    return out.view(x.shape)


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
