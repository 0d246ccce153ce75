"""Span detection's column totals (``spans._key_totals``): read along the band's diagonals in a fixed order, equal to
the scattered sums they replace."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("total,width", [(70, 64), (64, 64), (5, 8), (3, 1), (1, 4), (300, 16)])
def test_key_totals_equal_the_scattered_sums(total, width) -> None:
    """The band's column totals, read along diagonals (a fixed summation order on every device), equal the
    scatter-add of every band entry onto its key, for bands longer and shorter than their width."""
    from ltri_rag.spans import _key_totals

    gen = torch.Generator().manual_seed(total * 31 + width)
    key = torch.arange(total)[:, None] - torch.arange(width)[None, :]
    b = torch.where(key >= 0, torch.rand(3, total, width, generator=gen, dtype=torch.float64), 0.0)
    want = torch.zeros(3, total, dtype=torch.float64).index_add_(1, key.clamp(min=0).flatten(), b.reshape(3, -1))
    got = _key_totals(b)
    assert got.shape == (3, total)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
