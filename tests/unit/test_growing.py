"""Rows appended in place with spare capacity (``ltri_rag.growing.GrowingRows``) and the span table built on them."""

import pytest
import torch

from ltri_rag import growing
from ltri_rag.growing import GrowingRows
from ltri_rag.kernels.scoring import span_layout
from ltri_rag.span_memory import SpanTable


def test_appends_equal_concatenation_and_earlier_views_stay() -> None:
    gen = torch.Generator().manual_seed(0)
    store = GrowingRows(torch.zeros(0, 3, 2))
    pieces, views = [], []
    for size in (0, 5, 1, 17, 3, 64, 2):
        piece = torch.randn(size, 3, 2, generator=gen)
        pieces.append(piece)
        views.append((store.append(piece), torch.cat(pieces).clone()))
        assert len(store) == sum(p.shape[0] for p in pieces) <= store.capacity
    for view, want in views:  # each view as it was when taken, after every later append
        assert torch.equal(view, want)
    assert torch.equal(store.rows, torch.cat(pieces))


def test_capacity_grows_by_the_factor_so_copies_stay_linear(monkeypatch) -> None:
    store = GrowingRows(torch.zeros(0, dtype=torch.int64), growth=1.125)
    grown, copied, last = 0, 0, 0
    for step in range(2000):
        before = store.capacity
        store.append(torch.full((3,), step))
        if store.capacity != before:
            grown += 1
            copied += len(store) - 3  # the rows moved into the new buffer
            assert store.capacity >= min(int(before * 1.125) + 1, 10 ** 9)
        last = len(store)
    assert torch.equal(store.rows, torch.arange(2000).repeat_interleave(3))
    assert copied <= 10 * last  # ~1 / (growth - 1) copies per row, not one per append
    assert store.capacity <= 1.125 * last + 4 and grown < 100
    # a young buffer: equal appends (a prompt's chunks) grow it once per SPARE_APPENDS appends, not at every one
    young = GrowingRows(torch.zeros(0, 2), growth=1.125)
    growths = 0
    for step in range(30):
        before = young.capacity
        young.append(torch.full((700, 2), float(step)))
        growths += young.capacity != before
        assert young.capacity <= max(1.125 * len(young), len(young) + growing.SPARE_APPENDS * 700) + 1
    assert growths <= 30 // growing.SPARE_APPENDS + 1
    assert torch.equal(young.rows[::700, 0], torch.arange(30.0))
    # exact sizes (growth None, or the module default set to None): every append moves everything (torch.cat)
    monkeypatch.setattr(growing, "GROWTH", None)
    exact = GrowingRows(torch.zeros(0, dtype=torch.int64))
    for step in range(5):
        exact.append(torch.full((2,), step))
        assert exact.capacity == len(exact) == 2 * (step + 1)


def test_reset_takes_a_new_row_shape_and_bad_inputs_are_named() -> None:
    store = GrowingRows(torch.zeros(0, 4))
    store.append(torch.ones(3, 4))
    kept = store.rows
    assert torch.equal(store.reset(torch.zeros(2, 8)), torch.zeros(2, 8))
    assert torch.equal(kept, torch.ones(3, 4))  # the old buffer is left alone
    with pytest.raises(ValueError, match=r"rows of shape \(4,\) cannot join rows of shape \(8,\)"):
        store.append(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"empty must have no rows, got shape \(2, 4\)"):
        GrowingRows(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="growth must be a number > 1 or None, got 0.5"):
        GrowingRows(torch.zeros(0), growth=0.5)


def test_appends_in_and_out_of_inference_mode() -> None:
    store = GrowingRows(torch.zeros(0, 2))
    with torch.inference_mode():
        store.append(torch.ones(3, 2))
    store.append(torch.zeros(1, 2))  # a plain buffer: written outside inference mode too
    with torch.inference_mode():
        store.append(torch.full((40, 2), 2.0))
    assert store.rows.sum().item() == 6 + 160


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_span_table_appends_equal_one_layout_of_all_spans(quantized) -> None:
    """Many appends, the width growing on the way (rows widened), give the layout, owners and geometry of all
    spans laid out at once."""
    gen = torch.Generator().manual_seed(3)
    table = SpanTable(2, 8, torch.float32, torch.device("cpu"), quantized=quantized)
    all_vectors, all_owner, all_starts, lengths = [], [], [], []
    slot = 0
    for chunk in range(30):
        num_new = int(torch.randint(0, 6, (1,), generator=gen))
        most = 2 if chunk < 10 else (5 if chunk < 20 else 8)  # widths 2 -> 5 -> 8
        counts = torch.randint(1, most + 1, (num_new,), generator=gen)
        length = torch.randint(1, 9, (num_new,), generator=gen)
        starts = slot + torch.cumsum(length, 0) - length
        owner = torch.repeat_interleave(torch.arange(num_new), counts)
        owner = owner[torch.randperm(owner.numel(), generator=gen)]
        vectors = torch.randn(owner.numel(), 2, 8, generator=gen)
        table.append(starts, starts + length, vectors, owner)
        offset = sum(int(s.numel()) for s in all_starts)
        all_vectors.append(vectors)
        all_owner.append(owner + offset)
        all_starts.append(starts)
        lengths.append(length)
        slot += int(length.sum())
    num_spans = sum(int(s.numel()) for s in all_starts)
    want = span_layout(torch.cat(all_vectors), torch.cat(all_owner), num_spans, dtype=torch.float32,
                       quantize=quantized)
    got = table.layout()
    assert got.width == want.width == 8 and len(table) == num_spans
    assert torch.equal(got.valid, want.valid) and torch.equal(got.padded, want.padded)
    if quantized:
        assert torch.equal(got.scale, want.scale)
    assert torch.equal(table.starts, torch.cat(all_starts))
    assert torch.equal(table.lengths, torch.cat(lengths))
    assert table.num_tokens == slot and table.num_vectors == sum(v.shape[0] for v in all_vectors)
    assert torch.equal(table.owner, torch.sort(torch.cat(all_owner)).values)
