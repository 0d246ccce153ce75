"""The two-tier row gather (``kernels/triton_gather.py``) equals its torch reference and plain indexing.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET`` is set here, at
import, before the kernel module is loaded); with CUDA it runs compiled, reading the second tier from pinned host
memory. Skipped where triton does not import.
"""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_gather = kernel_module("triton_gather")


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


@pytest.mark.parametrize("dst_rows,n,head_dim,dtype", [
    (100, 37, 64, torch.float32),
    (70, 70, 128, torch.bfloat16),  # every row written
    (50, 17, 96, torch.float16),    # head_dim not a power of two
    (8, 0, 64, torch.float32),      # nothing to write
])
def test_scatter_rows_equals_index_copy(dst_rows, n, head_dim, dtype) -> None:
    gen = torch.Generator().manual_seed(dst_rows + n)
    dst = [torch.randn(dst_rows, head_dim, generator=gen).to(dtype) for _ in range(2)]
    if DEVICE == "cuda":  # the GPU writes pinned host memory in place
        dst = [t.pin_memory() for t in dst]
    expect = [t.clone() for t in dst]
    before = [t.cpu().clone() for t in dst]
    rows = torch.randperm(dst_rows, generator=gen)[:n]
    src = [torch.randn(n, head_dim, generator=gen).to(dtype) for _ in range(2)]
    for e, s in zip(expect, src):
        e[rows] = s
    triton_gather.scatter_rows(dst[0], dst[1], rows.to(DEVICE), src[0].to(DEVICE), src[1].to(DEVICE))
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # the kernel's writes land when the stream reaches them
    assert torch.equal(dst[0], expect[0]) and torch.equal(dst[1], expect[1])
    ref = [t.clone() for t in before]  # the torch fallback on the unwritten rows
    triton_gather.scatter_rows_torch(ref[0], ref[1], rows, src[0], src[1])
    assert torch.equal(ref[0], expect[0]) and torch.equal(ref[1], expect[1])


def test_scatter_bad_arguments_are_named() -> None:
    dst = [torch.zeros(4, 8) for _ in range(2)]
    src = [torch.ones(3, 8, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="rows must be"):
        triton_gather.scatter_rows(*dst, torch.zeros(2, dtype=torch.int64, device=DEVICE), *src)
    with pytest.raises(ValueError, match="src_k"):
        triton_gather.scatter_rows(*dst, torch.zeros(3, dtype=torch.int64, device=DEVICE), src[0].double(), src[1])
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="pinned"):
            triton_gather.scatter_rows(*dst, torch.arange(3, device=DEVICE), *src)
