"""Selecting spans on the compute device (``LtriConfig.selection_on_device``): the same spans, the same answers as
selecting on the host, with fixed-width slot lists and no read-back. Run here on the CPU (``True`` takes the device
path on a CPU model too); ``tests/gpu`` repeats the engine comparison on CUDA."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.consensus import LayerConsensus
from ltri_rag.layer import GlobalLayerState
from ltri_rag.pool import PagedKVPool
from ltri_rag.span_memory import SpanTable
from tests.unit.tiny_models import FAMILIES, exact_config, reference_logits, tiny_model
from tests.unit.tiny_models import random_ids as _ids


def _spans(lengths: list[int], gaps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Spans of ``lengths`` with ``gaps[i]`` free slots before span ``i`` (host ``starts``, ``ends``)."""
    starts, ends, at = [], [], 0
    for length, gap in zip(lengths, gaps):
        at += gap
        starts.append(at)
        ends.append(at + length)
        at += length
    return torch.tensor(starts), torch.tensor(ends)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rows", [1, 3])
def test_fixed_slot_lists_equal_the_host_ones_padded(seed: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    table = SpanTable(3, 4, torch.float32, torch.device("cpu"))
    for _ in range(3):  # appended in pieces, some with free slots between spans
        n = int(torch.randint(1, 9, (1,), generator=gen))
        lengths = torch.randint(1, 7, (n,), generator=gen).tolist()
        gaps = (torch.randint(0, 3, (n,), generator=gen) * (seed % 2)).tolist()
        starts, ends = _spans(lengths, gaps)
        offset = int(table.ends[-1]) if len(table) else 0
        table.append(starts + offset, ends + offset, torch.randn(n, 3, 4, generator=gen), torch.arange(n))
    selected = torch.rand(rows, len(table), generator=gen) < 0.5
    host = table.slot_matrix(selected, 3)
    width = max(host.shape[1], 1) + int(torch.randint(0, 4, (1,), generator=gen))
    fixed = table.slot_matrix_fixed(selected, 3, width)
    assert fixed.shape == (3, width)
    assert torch.equal(fixed[:, : host.shape[1]], host)
    assert bool((fixed[:, host.shape[1]:] == -1).all())
    # a span-by-span check against the spans themselves: each row lists its selected spans' slots in order
    for row in range(3):
        expect = [slot for span in range(len(table)) if selected[row % rows, span]
                  for slot in range(int(table.starts[span]), int(table.ends[span]))][:width]
        assert fixed[row, : len(expect)].tolist() == expect


def test_fixed_slot_lists_drop_what_is_past_the_width() -> None:
    table = SpanTable(1, 2, torch.float32, torch.device("cpu"))
    starts, ends = _spans([3, 2, 4], [0, 0, 0])
    table.append(starts, ends, torch.zeros(3, 1, 2), torch.arange(3))
    out = table.slot_matrix_fixed(torch.tensor([[True, False, True]]), 1, 5)
    assert out.tolist() == [[0, 1, 2, 5, 6]]
    with pytest.raises(ValueError, match="rows"):
        table.slot_matrix_fixed(torch.ones(2, 3, dtype=torch.bool), 3, 4)


def test_pool_device_lookups_equal_the_host_ones() -> None:
    """``gather_on_device`` and the device copy of the positions equal the host paths, also after slots are given
    back and taken again (the copies follow every change)."""
    pool = PagedKVPool(2, 4, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    k_all, v_all = torch.randn(40, 2, 8, generator=gen), torch.randn(40, 2, 8, generator=gen)
    first = pool.reserve(13)
    for seq in range(2):
        pool.write(0, seq, first, k_all[seq:seq + 13], v_all[seq:seq + 13])
        pool.set_positions(seq, first, torch.arange(13) * 3 + seq)
    assert torch.equal(pool._positions_on(1, torch.device("cpu")), torch.arange(13) * 3 + 1)
    pool.unreserve(10)
    first = pool.reserve(9)
    for seq in range(2):  # every slot read below written (pages come from torch.empty: NaN would fail equality)
        pool.write(0, seq, first, k_all[20 + seq:29 + seq], v_all[20 + seq:29 + seq])
    pool.set_positions(1, first, torch.arange(100, 109))
    slots = torch.tensor([[0, 5, 12, 18], [3, 3, 9, 10]])
    for seq in range(2):
        k_host, v_host = pool.gather(0, seq, slots, torch.device("cpu"))
        k_dev, v_dev = pool.gather_on_device(0, seq, slots)
        assert torch.equal(k_dev, k_host) and torch.equal(v_dev, v_host)
    expected = torch.cat([torch.arange(10) * 3 + 1, torch.arange(100, 109)])
    assert torch.equal(pool._positions_on(1, torch.device("cpu")), expected)
    assert pool.on_device_tier(0, torch.device("cpu")) and not pool.on_device_tier(0, torch.device("meta"))
    split = PagedKVPool(1, 4, torch.device("cpu"), device_pages=2)
    split.reserve(6)
    assert split.on_device_tier(0, torch.device("cpu"))
    split.reserve(6)  # a third page: past the first tier
    assert not split.on_device_tier(0, torch.device("cpu"))


def test_consensus_gives_the_same_prior_wherever_it_is_kept() -> None:
    lengths = torch.tensor([3, 1, 4, 2])
    host, other = LayerConsensus(1), LayerConsensus(1)
    for votes in ([True, False, True, False], [False, False, True, True]):
        host.deposit(0, lengths, torch.tensor(votes))
        other.deposit(0, lengths, torch.tensor(votes).to(torch.float32))
    host.commit()
    other.commit()
    assert torch.equal(host.span_prior(0, lengths), other.span_prior(0, lengths, device=torch.device("cpu")))
    assert host.span_prior(0, lengths).tolist() == [0.5, 0.0, 1.0, 0.5]


def _sessions(model, config: LtriConfig, batch_size: int = 1) -> list[LtriSession]:
    return [LtriSession(model, config.replace(selection_on_device=False), batch_size=batch_size),
            LtriSession(model, config.replace(selection_on_device=True), batch_size=batch_size)]


def _record_slots(session: LtriSession, method: str = "_placed_memory") -> list[list[torch.Tensor]]:
    """Wrap every global layer's ``method`` (``_placed_memory``, which every assembly path passes, also a decode
    step that reuses its placed memory) to record its slot lists (per sequence, ``-1`` columns dropped), and count the session's gathers by
    device slot lists in ``session.device_gathers``."""
    seen: list[list[torch.Tensor]] = []
    session.device_gathers = 0  # type: ignore[attr-defined]
    pool = session.cache.pool
    gather = pool.gather_on_device

    def counted(*args, **kwargs):
        session.device_gathers += 1  # type: ignore[attr-defined]
        return gather(*args, **kwargs)

    pool.gather_on_device = counted  # type: ignore[method-assign]
    for state in session.cache.states:
        if isinstance(state, GlobalLayerState):
            inner = getattr(state, method)

            def recorded(*args, _inner=inner, _state=state, **kwargs):
                out = _inner(*args, **kwargs)
                seen.append([s[:, : int((s >= 0).sum(dim=1).max())] if s.numel() else s for s in _state._last_slots])
                return out

            setattr(state, method, recorded)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["contiguous", "fixed", "absolute"])
def test_device_selection_chooses_the_same_spans_as_the_host(family: str, scheme: str) -> None:
    """With a budget far below the memory (selection matters), consensus, look-ahead and persistence on: the same
    slots at every layer and step, prompt and decode, and the same logits."""
    model = tiny_model(family)
    ids = _ids(2, 90, seed=5)
    cfg = LtriConfig(num_sink_tokens=3, local_window=16, chunk_size=9, final_chunk_size=4, budget=14, page_size=5,
                     evict_stride=4, span_min_len=2, span_max_len=8, position_scheme=scheme)
    sessions = _sessions(model, cfg, batch_size=2)
    slots = [_record_slots(s) for s in sessions]
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    for token in (7, 100, 3, 250, 42, 9):
        nxt = torch.tensor([token, token + 1])
        logits = [s.step(nxt) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    assert len(slots[0]) == len(slots[1]) > 0
    assert any(s.numel() for step in slots[0] for s in step)  # spans were retrieved
    for host, dev in zip(*slots):
        assert len(host) == len(dev) and all(torch.equal(a, b) for a, b in zip(host, dev))
    assert sessions[0].device_gathers == 0 and sessions[1].device_gathers > 0
    usage = [s.usage() for s in sessions]
    assert usage[0] == usage[1] and 0 < usage[0]["retrieved_tokens"] <= cfg.budget


@pytest.mark.parametrize("overrides", [{"retrieval_scope": "per_kv_head", "voting": True},
                                       {"pin_prompt_spans": True}, {"consensus_weight": 0.0, "persistence": False}])
def test_device_selection_with_other_selection_options(overrides: dict) -> None:
    model = tiny_model("llama")
    ids = _ids(1, 80, seed=6)
    cfg = LtriConfig(num_sink_tokens=3, local_window=16, chunk_size=9, final_chunk_size=4, budget=12, page_size=5,
                     evict_stride=4, span_min_len=2, span_max_len=8, **overrides)
    sessions = _sessions(model, cfg)
    slots = [_record_slots(s) for s in sessions]
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    for token in (5, 6, 7, 8, 9):
        logits = [s.step(torch.tensor([token])) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    assert len(slots[0]) == len(slots[1]) > 0
    for host, dev in zip(*slots):
        assert len(host) == len(dev) and all(torch.equal(a, b) for a, b in zip(host, dev))
    assert sessions[0].device_gathers == 0 and sessions[1].device_gathers > 0


def test_device_selection_stays_exact_and_falls_back_when_it_must() -> None:
    """Every span retrieved at its true position: still the unmodified model. ``pin_extra_budget`` (a selection
    that may outgrow the fixed width), ``False`` and ``"auto"`` (the default) on a CPU select on the host."""
    model = tiny_model("qwen2")
    ids = _ids(2, 70, seed=2)
    session = LtriSession(model, exact_config("ltri", 7, selection_on_device=True), batch_size=2)
    torch.testing.assert_close(session.feed(ids, return_all_logits=True), reference_logits(model, ids),
                               atol=1e-4, rtol=0)
    state = next(s for s in session.cache.states if isinstance(s, GlobalLayerState))
    q = torch.zeros(2, 4, 1, 16)
    assert state._selects_on_device(q)
    assert LtriConfig().selection_on_device == "auto"
    for changes, expected in (({"selection_on_device": False}, False),
                              ({"selection_on_device": "auto"}, False),  # on the CPU: the host path
                              ({"selection_on_device": "auto", "attention_backend": "triton"}, False),
                              ({"pin_prompt_spans": True, "pin_extra_budget": True}, False)):
        state.cfg = session.cache.config.replace(**changes)
        assert state._selects_on_device(q) is expected
    for bad in ("on", 1, None):
        with pytest.raises(TypeError, match="selection_on_device"):
            LtriConfig(selection_on_device=bad)


@pytest.mark.parametrize("scheme", ["contiguous", "fixed", "absolute"])
def test_fused_device_assembly_equals_the_torch_path(scheme: str, monkeypatch) -> None:
    """``layer_assembly.FUSED_DEVICE_ASSEMBLY`` (the memory part of a device selection in one Triton launch per
    sequence, here under the interpreter on the CPU with the Triton backend): the same slots and logits as the torch
    assembly, prompt and decode, batch of two."""
    import importlib
    import os

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from ltri_rag import layer_assembly as layer_mod
    from ltri_rag.kernels import triton_assemble, triton_local, triton_rope, triton_scoring, triton_select

    for module in (triton_assemble, triton_local, triton_rope, triton_scoring, triton_select):
        if not module.INTERPRETED:  # imported earlier in this process without the interpreter
            importlib.reload(module)
    importlib.reload(importlib.import_module("ltri_rag.kernels.triton_decode"))
    importlib.reload(importlib.import_module("ltri_rag.kernels.triton_gather"))
    assert os.environ["TRITON_INTERPRET"] == "1"
    kernel = importlib.import_module("ltri_rag.kernels.triton_assemble").assemble_memory
    launches = []

    def counted(*args, **kwargs):
        launches.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(layer_mod, "assemble_memory", counted)
    model = tiny_model("llama")
    ids = _ids(2, 60, seed=8)
    cfg = LtriConfig(num_sink_tokens=3, local_window=16, chunk_size=9, final_chunk_size=4, budget=12, page_size=5,
                     evict_stride=4, span_min_len=2, span_max_len=8, position_scheme=scheme,
                     selection_on_device=True, attention_backend="triton")
    outputs, per_run = [], []
    for fused in (False, True):
        monkeypatch.setattr(layer_mod, "FUSED_DEVICE_ASSEMBLY", fused)
        before = len(launches)
        session = LtriSession(model, cfg, batch_size=2)
        slots = _record_slots(session, "_placed_memory")
        logits = [session.feed(ids)]
        for token in (7, 100, 3):
            logits.append(session.step(torch.tensor([token, token + 1])))
        outputs.append((logits, slots))
        per_run.append(len(launches) - before)
    for a, b in zip(outputs[0][0], outputs[1][0]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert per_run[0] == 0 and per_run[1] > 0  # the fused path ran, only with the flag on
    assert len(outputs[0][1]) == len(outputs[1][1]) > 0
    for host, dev in zip(outputs[0][1], outputs[1][1]):
        assert all(torch.equal(x, y) for x, y in zip(host, dev))
