"""The index-token benchmark runs end to end on small segments; both forms agree (speed numbers are not tested)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.bench_index_tokens import main, make_segments, previous_bookkeeping
from ltri_rag.index_vectors import select_index_tokens, select_index_tokens_batch, span_bookkeeping


def test_small_run_writes_rows_and_both_forms_agree(tmp_path) -> None:
    before = torch.get_num_threads()
    main(["--layers", "3", "--tokens", "96", "--spans", "9", "--kv-heads", "2", "--threads", "1", "--reps", "2",
          "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["threads"] for r in rows] == [1] and rows[0]["same_result"] is True
    assert rows[0]["previous_ms"] > 0 and rows[0]["numpy_ms"] > 0
    assert "| 1 |" in (tmp_path / "bench.md").read_text()
    assert torch.get_num_threads() == before  # the thread setting is restored


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_bookkeeping_equals_the_previous_torch_form(seed) -> None:
    mass, segments = make_segments(4, 200, 17, 3, seed=seed)
    span_of_token, kept, owners = span_bookkeeping(segments, 200)
    want_of, want_kept, want_owners = previous_bookkeeping(segments, 200)
    assert torch.equal(span_of_token, want_of) and torch.equal(kept, want_kept)
    assert all(torch.equal(a, b) and a.dtype == b.dtype == torch.int64 for a, b in zip(owners, want_owners))
    # and the whole batch call still equals one segment at a time
    token_idx, batch_owners = select_index_tokens_batch(mass, segments)
    offset = 0
    for b, (starts, ends, counts) in enumerate(segments):
        idx, owner = select_index_tokens(mass[b], starts, ends, counts)
        assert torch.equal(token_idx[offset:offset + idx.shape[0]], idx) and torch.equal(batch_owners[b], owner)
        offset += idx.shape[0]


def test_bad_arguments_are_named(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--threads", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="spans must be in"):
        make_segments(1, 10, 11, 1)
