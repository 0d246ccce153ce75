"""On CUDA: the engine equals the unmodified model (float32) and stays close in bfloat16. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriSession
from tests.unit.test_exactness import _ids, exact_config
from tests.unit.tiny_models import FAMILIES, greedy_logits, reference_logits, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# the span pool: all in pinned host memory, all on the GPU, the default (GPU up to a share of free memory: all of
# it here), and a GPU tier of a few pages with the rest spilled to the host (retrievals gather from both tiers)
POOLS = {"host": {"kv_offload": True}, "gpu": {"kv_offload": False}, "auto": {},
         "auto_split": {"kv_offload": "auto", "kv_device_gib": 3e-6}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["infllm", "ltri"])
@pytest.mark.parametrize("pool", list(POOLS))
def test_cuda_prefill_equals_full_attention(family: str, mode: str, pool: str) -> None:
    model = tiny_model(family).cuda()
    ids = _ids(2, 97).cuda()
    ref = reference_logits(model, ids)
    session = LtriSession(model, exact_config(mode, 9, **POOLS[pool]), batch_size=2)
    out = session.feed(ids, return_all_logits=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    pool_obj = session.cache.pool
    if pool == "auto_split":  # both tiers really in use
        assert 0 < pool_obj.pages_on_device < pool_obj.num_pages
    elif pool in ("gpu", "auto"):
        assert pool_obj.pages_on_device == pool_obj.num_pages > 0
    else:
        assert pool_obj.pages_on_device == 0


def test_cuda_bfloat16_close() -> None:
    model = tiny_model("qwen2").cuda().to(torch.bfloat16)
    ids = _ids(1, 90).cuda()
    ref = reference_logits(model, ids).float()
    out = LtriSession(model, exact_config("ltri", 8)).feed(ids, return_all_logits=True).float()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("pool", ["gpu", "auto_split"])
def test_cuda_device_selection_matches_the_host_and_never_waits(family: str, pool: str) -> None:
    """On CUDA, ``selection_on_device=True`` chooses the same spans as the host path under a
    small budget, and a layer's retrieval (scoring, selection, slot lists, gather, assembly) makes no host-device
    synchronisation (torch's sync debug mode raises on one); with pages spilled to host memory it falls back to the
    host path and still agrees."""
    from ltri_rag import LtriConfig
    from ltri_rag.layer import GlobalLayerState

    model = tiny_model(family).cuda()
    ids = _ids(2, 120).cuda()
    cfg = LtriConfig(num_sink_tokens=3, local_window=16, chunk_size=9, final_chunk_size=4, budget=14, page_size=5,
                     evict_stride=4, span_min_len=2, span_max_len=8, **POOLS[pool])
    sessions = [LtriSession(model, cfg.replace(selection_on_device=False), batch_size=2),
                LtriSession(model, cfg.replace(selection_on_device=True), batch_size=2)]
    checked = [0]
    for state in sessions[1].cache.states:
        if not isinstance(state, GlobalLayerState):
            continue
        # the torch assembly and the one-launch one (layer_assembly.FUSED_DEVICE_ASSEMBLY, on by default)
        for name in ("_memory", "_device_assembled_memory"):
            inner = getattr(state, name)

            def strict(q, *args, _inner=inner, _state=state, **kwargs):
                if not _state._selects_on_device(q):
                    return _inner(q, *args, **kwargs)
                checked[0] += 1
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return _inner(q, *args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            setattr(state, name, strict)
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=2e-4, rtol=0)
    for token in (7, 100, 3, 250, 42):
        nxt = torch.tensor([token, token + 1], device="cuda")
        logits = [s.step(nxt) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=2e-4, rtol=0)
    if pool == "gpu":
        assert checked[0] > 0
        state = next(s for s in sessions[1].cache.states if isinstance(s, GlobalLayerState))
        state.cfg = state.cfg.replace(selection_on_device="auto")  # the default: the device path on CUDA
        assert state._selects_on_device(torch.zeros(2, 4, 1, 16, device="cuda"))
    else:
        assert 0 < sessions[1].cache.pool.pages_on_device < sessions[1].cache.pool.num_pages


@pytest.mark.parametrize("pool", ["gpu", "auto_split"])
def test_cuda_runs_repeat_bit_for_bit(pool: str) -> None:
    """Two sessions over the same prompt, bfloat16, many evictions (spans cut on the attention band, index vectors,
    device selection, the one-launch assembly, graph-replayed decode steps; with ``auto_split`` host pages read in
    place through the host-row cache): the same logits bit for bit at every step. Nothing in the engine may add
    floats in an order that changes between runs (an ``index_add_`` did, in span detection)."""
    from ltri_rag import LtriConfig

    model = tiny_model("llama").cuda().to(torch.bfloat16)
    ids = _ids(1, 400).cuda()
    cfg = LtriConfig(num_sink_tokens=4, local_window=32, chunk_size=16, budget=24, page_size=8, evict_stride=8,
                     span_min_len=2, span_max_len=12, **POOLS[pool])
    runs = []
    for _ in range(2):
        runs.append(greedy_logits(LtriSession(model, cfg), ids, 6))
    for step, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"step {step}"


@pytest.mark.parametrize("switch", ["consensus.FUSED_CONSENSUS:prior_and_deposit",
                                    "span_memory.FUSED_SLOTS:place_slots", "retrieval.PAIRED_SORT:_fill_budget",
                                    "retrieval.FUSED_RECENCY:update_recency_triton",
                                    "kernels.triton_assemble.SLOT_GLUE_IN_KERNEL:layer_assembly.assemble_memory",
                                    "kernels.triton_decode.FUSED_FINISH:kernels.triton_decode.decode_attention_triton",
                                    "kernels.triton_decode.PDL_FINISH:kernels.triton_decode.decode_attention_triton"])
def test_cuda_one_launch_glue_changes_nothing(switch: str, monkeypatch) -> None:
    """The consensus read and vote in one launch (``consensus.FUSED_CONSENSUS``, against eleven torch operations) and
    the slot placement in one launch (``span_memory.FUSED_SLOTS``, against a binary search and ten operations), a
    layer's two selections ranked and filled together (``retrieval.PAIRED_SORT``, against one after the other), the
    persistence update in one launch (``retrieval.FUSED_RECENCY``, against four operations), the memory assembly
    finding its counts itself (``triton_assemble.SLOT_GLUE_IN_KERNEL``) and the decode attention in one launch
    (``triton_decode.FUSED_FINISH``) or with its finish as a programmatic dependent launch
    (``triton_decode.PDL_FINISH``): the same logits bit for bit at every step (prompt passes selecting on the
    device, graph-replayed decode steps), and the kernel (or the launcher, where ``SWITCH:MODULE.FUNCTION`` names
    it) ran. Where the spied launcher runs whichever way the switch is set, the switch's own path is checked too:
    the assembly kernel launched to derive its counts, the one-launch decode attention used its arrival counters and
    left them at 0, the finishing launches waited on the split pass (on compute capability 9.0 and later), and
    none of these happened with the switch off."""
    import importlib

    from ltri_rag import LtriConfig
    from tests.unit.triton_modules import record_launch_flag

    target, spied = switch.split(":")
    module_name, flag = target.rsplit(".", 1)
    module = importlib.import_module(f"ltri_rag.{module_name}")
    owner_name, _, kernel_name = spied.rpartition(".")
    owner = importlib.import_module(f"ltri_rag.{owner_name}") if owner_name else module
    calls = []
    kernel = getattr(owner, kernel_name)

    def spy(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(owner, kernel_name, spy)
    derived = record_launch_flag(monkeypatch, importlib.import_module("ltri_rag.kernels.triton_assemble"),
                                 ("_assemble_halves_kernel", "_assemble_kernel"), "DERIVE")
    from ltri_rag.kernels._triton_support import dependent_launch

    waited = record_launch_flag(monkeypatch, importlib.import_module("ltri_rag.kernels.triton_decode"),
                                ("_decode_finish_kernel",), "GDC_WAIT")
    pdl_here = dependent_launch(torch.device("cuda", torch.cuda.current_device()))
    model = tiny_model("llama").cuda().to(torch.bfloat16)
    ids = _ids(1, 400).cuda()
    cfg = LtriConfig(num_sink_tokens=4, local_window=32, chunk_size=16, budget=24, page_size=8, evict_stride=8,
                     span_min_len=2, span_max_len=12)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(module, flag, fused)
        if flag == "FUSED_FINISH":
            monkeypatch.setattr(module, "_COUNTERS", {})  # made by the one-launch form only
        calls.clear()
        derived.clear()
        waited.clear()
        runs.append(greedy_logits(LtriSession(model, cfg), ids, 6))
        if fused:
            assert calls, f"{kernel_name} never ran"
        if flag == "SLOT_GLUE_IN_KERNEL":  # the assembly kernel finds its counts itself exactly when switched on
            assert derived and all(derived) == fused and any(derived) == fused
        if flag == "FUSED_FINISH":
            counters = list(module._COUNTERS.values())
            assert bool(counters) == fused
            assert not any(bool(c.any()) for c in counters)  # every launch left its counters at 0
        if flag == "PDL_FINISH":  # every finishing launch waited on the split pass exactly when switched on
            assert waited and set(waited) == {fused and pdl_here}
    for step, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"step {step}"
