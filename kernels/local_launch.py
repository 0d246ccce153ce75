"""Launch settings of the local attention kernels (``kernels/triton_local.py``): plain Python, no triton."""

from __future__ import annotations

import torch

__all__ = ["block_sizes", "launch_setting"]


def launch_setting(value: int | None, default: int, name: str, allowed) -> int:
    """``value`` checked against ``allowed`` (``default`` when None)."""
    if value is None:
        return default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def block_sizes(head_dim: int, group: int, device: torch.device,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """``(block_m, block_n, num_warps, num_stages)`` for :func:`local_attention_triton`.

    ``block_m`` counts packed ``(query, head)`` rows, ``block_n`` keys. Off CUDA (the interpreter) small blocks
    keep the per-program numpy work light. The 16-bit CUDA values come from the launch-settings sweep on an H200
    (``benchmarks/bench_local_attention.py --sweep``: 36 settings, one chunk of 2,048 queries against a 4,096-key
    window, key mass and a band of 64 on; ``benchmarks/results/local_attention_h200/sweep.md``): at head_dim 64
    (Qwen2.5-0.5B, 7 query heads per KV head) 128 x 32 with 4 warps and 3 stages took 0.44 ms against 0.78 ms for
    the earlier untuned 64 x 64 / 8 warps / 2 stages; at head_dim 128 (Llama-3-8B, group 4) 64 x 64 / 4 / 3 took
    1.04 ms against 1.70. Float32 inputs and head_dim 256 keep the untuned settings that compile without register
    spills (checked with ptxas for sm_90).
    """
    del group  # packing makes the row count independent of the group; kept for tuning by group later
    if device.type != "cuda":
        return 32, 32, 1, 1
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 8, 2
    if head_dim <= 64:
        return 128, 32, 4, 3
    return 64, 64, 4, 3
