"""The index-vector precision check's pieces: 8-bit rounding within its bounds, the patch restored, recall."""

from __future__ import annotations

import pytest
import torch

from benchmarks.index_vector_precision import recall, round_vectors, rounded_index_vectors


def test_rounding_keeps_each_vector_within_its_format() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 64, generator=gen) * torch.logspace(-3, 2, 50)[:, None, None]
    x[3] = 0.0  # a zero vector stays zero (no division by its zero scale)
    amax = x.abs().amax(dim=-1, keepdim=True)
    fp8 = round_vectors(x, "fp8")
    int8 = round_vectors(x, "int8")
    assert fp8.dtype == int8.dtype == x.dtype and fp8.shape == x.shape
    assert torch.equal(fp8[3], x[3]) and torch.equal(int8[3], x[3])
    # e4m3 keeps 3 mantissa bits: a value at the top binade is off by at most 2^-4 of its magnitude
    assert ((fp8 - x).abs() <= amax * 2.0 ** -4 + 1e-12).all()
    assert ((int8 - x).abs() <= amax / 127 / 2 * (1 + 1e-5) + 1e-12).all()
    assert not torch.equal(fp8, x) and not torch.equal(int8, x)  # it does round
    assert torch.equal(round_vectors(x.bfloat16(), "fp8").float().abs().amax(-1, keepdim=True) > 0, amax > 0)
    with pytest.raises(ValueError, match="'int4'"):
        round_vectors(x, "int4")


def test_patch_rounds_the_stored_vectors_and_is_undone() -> None:
    from ltri_rag import span_memory

    original = span_memory.span_layout
    vectors = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(1))
    owner = torch.tensor([0, 0, 1, 1, 1, 2])
    with rounded_index_vectors("int8"):
        padded, valid, width, _ = span_memory.span_layout(vectors, owner, 3)
    assert span_memory.span_layout is original
    expected = original(round_vectors(vectors, "int8"), owner, 3).padded
    assert width == 3 and torch.equal(padded, expected) and int(valid.sum()) == 6
    with rounded_index_vectors(None):
        assert span_memory.span_layout is original


def test_recall_is_the_share_of_the_reference_rows_kept() -> None:
    ref = {"positions": [[1, 2, 3, 4], [5, 6]]}
    assert recall(ref, {"positions": [[1, 2, 3, 4], [5, 6]]}) == 1.0
    assert recall(ref, {"positions": [[1, 2], [5, 6, 7]]}) == pytest.approx((0.5 + 1.0) / 2)
    assert recall(ref, {"positions": [[1, 2, 3, 4, 5, 6]]}) == 1.0  # one shared row against per-head rows
    assert recall({"positions": None}, ref) is None
