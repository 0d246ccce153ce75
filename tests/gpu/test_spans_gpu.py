"""On CUDA: span segmentation of bands on the GPU (its read-back through page-locked buffers) gives the spans and
ranks of the same bands segmented on the CPU, and of the pageable read-back. Skipped without a GPU."""

import pytest
import torch

from ltri_rag import spans as spans_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("batch, rows, extra, width", [(32, 2048, 64, 64), (3, 300, 0, 24), (1, 17, 5, 8)])
def test_segmentation_on_cuda_equals_cpu(batch, rows, extra, width, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(rows)
    band = torch.rand(batch, rows + extra, width, generator=gen) ** 4  # peaked, like attention mass
    kwargs = dict(alpha=1.0, min_len=8, max_len=64, min_score=0.0, first_row_pos=128)
    want = spans_module.segment_triangle_batch(band, rows, **kwargs)
    results = []
    for pinned in (True, False):
        monkeypatch.setattr(spans_module, "PINNED_READ_BACK", pinned)
        results.append(spans_module.segment_triangle_batch(band.cuda(), rows, **kwargs))
    for got in results:
        assert len(got) == batch
        for g, w in zip(got, want):
            assert torch.equal(g.starts, w.starts) and torch.equal(g.ends, w.ends)
            assert g.rank.dtype == w.rank.dtype == torch.float32
            torch.testing.assert_close(g.rank, w.rank, atol=1e-6, rtol=1e-6)
    for g, p in zip(*results):  # the two read-backs of the same device ranks: bit for bit
        assert torch.equal(g.rank, p.rank)
