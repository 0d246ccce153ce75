"""The one-launch slot placement (``kernels.triton_slots.place_slots``) equals the torch path of
``SpanTable.slot_matrix_fixed`` exactly: one row or one per KV head, spans longer than a token tile, rows that select
nothing or everything, widths that drop tokens, spans spread over several programs. On CPU under
``TRITON_INTERPRET`` (set here, before the kernel module is imported); compiled on a GPU."""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_slots = kernel_module("triton_slots")

from ltri_rag import span_memory
from ltri_rag.span_memory import SpanTable


def _table(lengths: list[int], gap: int = 3) -> SpanTable:
    """A table of spans with those lengths, ``gap`` slots apart (slots need not be contiguous)."""
    table = SpanTable(num_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device(DEVICE))
    starts, position = [], 0
    for length in lengths:
        starts.append(position)
        position += length + gap
    table.starts = torch.tensor(starts, dtype=torch.int64)
    table.ends = table.starts + torch.tensor(lengths, dtype=torch.int64)
    return table


# (num_spans, max_len, rows, select probability, width)
CASES = [(1, 5, 1, 1.0, 8), (10, 9, 1, 0.5, 64), (70, 150, 2, 0.3, 3000), (200, 12, 2, 0.4, 100),
         (30, 7, 1, 0.0, 16), (40, 6, 2, 1.0, 400), (5, 3, 1, 1.0, 0)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "S{}L{}R{}p{}W{}".format(*c))
def test_matches_the_torch_slot_matrix(case, monkeypatch) -> None:
    num_spans, max_len, rows, p, width = case
    gen = torch.Generator().manual_seed(num_spans)
    lengths = torch.randint(1, max_len + 1, (num_spans,), generator=gen).tolist()
    table = _table(lengths)
    selected = (torch.rand(rows, num_spans, generator=gen) < p).to(DEVICE)
    monkeypatch.setattr(span_memory, "FUSED_SLOTS", False)
    want = table.slot_matrix_fixed(selected, 2, width)
    lengths_on, _ = table.geometry_on(torch.device(DEVICE))
    taken = torch.where(selected, lengths_on, 0)
    got = triton_slots.place_slots(taken, torch.cumsum(taken, dim=1), table.starts_on(torch.device(DEVICE)), width,
                                   block_s=16, block_t=16, block_w=32)
    assert torch.equal(got.expand(2, -1) if rows == 1 else got, want)
    full = table.slot_matrix(selected, 2)  # the host path, padded to the width
    padded = torch.full((2, max(width, full.shape[1])), -1, dtype=torch.int64)
    padded[:, :full.shape[1]] = full
    assert torch.equal(want.cpu(), padded[:, :width])


def test_bad_inputs_raise() -> None:
    taken = torch.ones(1, 3, dtype=torch.int64, device=DEVICE)
    starts = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="must be one \\[R, S\\] shape"):
        triton_slots.place_slots(taken, taken[:, :2], starts, 4)
    with pytest.raises(ValueError, match="must be int64"):
        triton_slots.place_slots(taken.int(), taken, starts, 4)
    with pytest.raises(ValueError, match="width must be >= 0, got -1"):
        triton_slots.place_slots(taken, taken, starts, -1)
