"""The two-tier row gather (``kernels/triton_gather.py``) equals its torch reference and plain indexing.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET`` is set here, at
import, before the kernel module is loaded); with CUDA it runs compiled, reading the second tier from pinned host
memory. Skipped where triton does not import.
"""

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from ltri_rag.kernels import triton_gather

if DEVICE == "cpu" and not triton_gather.INTERPRETED:  # imported earlier in this process without the interpreter
    triton_gather = importlib.reload(triton_gather)


def _tiers(fast_rows: int, slow_rows: int, head_dim: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    fast = [torch.randn(fast_rows, head_dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2)]
    slow = [torch.randn(slow_rows, head_dim, generator=gen).to(dtype) for _ in range(2)]
    if DEVICE == "cuda":
        slow = [t.pin_memory() for t in slow]
    return fast, slow, gen


@pytest.mark.parametrize("fast_rows,slow_rows,n,head_dim,dtype", [
    (40, 60, 33, 64, torch.float32),
    (40, 60, 200, 128, torch.bfloat16),  # more rows than either tier: repeats
    (0, 50, 17, 64, torch.float16),      # no first tier (kv_device_gib=0)
    (50, 0, 17, 96, torch.float32),      # nothing spilled yet; head_dim not a power of two
    (8, 8, 0, 64, torch.float32),        # nothing to gather
])
def test_two_tier_gather_equals_indexing(fast_rows, slow_rows, n, head_dim, dtype) -> None:
    (fk, fv), (sk, sv), gen = _tiers(fast_rows, slow_rows, head_dim, dtype, seed=n + head_dim)
    rows = torch.randint(0, fast_rows + slow_rows, (n,), generator=gen)
    both_k, both_v = torch.cat([fk.cpu(), sk]), torch.cat([fv.cpu(), sv])
    k, v = triton_gather.gather_two_tiers(fk, fv, sk, sv, rows.to(DEVICE), fast_rows)
    assert k.device.type == DEVICE and k.shape == (n, head_dim) and k.dtype == dtype
    assert torch.equal(k.cpu(), both_k[rows]) and torch.equal(v.cpu(), both_v[rows])
    if DEVICE == "cpu":  # the reference takes every tensor on one device
        rk, rv = triton_gather.gather_two_tiers_torch(fk, fv, sk, sv, rows, fast_rows)
        assert torch.equal(rk, k) and torch.equal(rv, v)


def test_bad_arguments_are_named() -> None:
    (fk, fv), (sk, sv), _ = _tiers(4, 4, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="rows must be"):
        triton_gather.gather_two_tiers(fk, fv, sk, sv, torch.zeros(3, dtype=torch.int32, device=DEVICE), 4)
    with pytest.raises(ValueError, match="slow_k"):
        triton_gather.gather_two_tiers(fk, fv, sk.double(), sv, torch.zeros(3, dtype=torch.int64, device=DEVICE), 4)
