"""On CUDA: decode steps captured and replayed as a CUDA graph (``ltri_rag.decode_graph``) compute what the eager
steps compute. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.decode_graph import DecodeGraph
from tests.unit.tiny_models import random_ids, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _config(**overrides) -> LtriConfig:
    base = dict(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                evict_stride=6, span_max_len=8, decode_retrieval_stride=4, attention_backend="triton")
    base.update(overrides)
    return LtriConfig(**base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(), dict(mode="streaming", decode_retrieval_stride=5),
                                  dict(batch=2, position_scheme="absolute", kv_offload=True),
                                  dict(mode="infllm", position_scheme="contiguous", evict_stride=9),
                                  dict(evict_stride=24, decode_retrieval_stride=2),
                                  dict(batch=2, evict_stride=30, decode_retrieval_stride=3, voting=True,
                                       retrieval_scope="per_kv_head"),
                                  dict(evict_stride=24, decode_retrieval_stride=1),
                                  dict(evict_stride=24, decode_retrieval_stride=1, kv_device_gib=1e-9,
                                       zero_copy_host_pages=True)],
                         ids=["ltri", "streaming", "batch2-host-pool", "infllm", "ltri-long-cycles",
                              "batch2-voting-per-kv-head", "ltri-stride1", "ltri-host-tier-read-in-graph"])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a capture that fails (and falls back) fails the test
def test_replayed_steps_equal_the_uncaptured_graph_form_and_the_eager_steps(dtype, case) -> None:
    """Three sessions decode the same 48 tokens: eager, graph form without capture, graph form captured. The
    replays are bit-for-bit the uncaptured graph form (the same kernels on the same shapes) and match the eager
    steps to float rounding; most steps are replays. One graph serves every reuse step; a retrieving step (pool on
    the device) is captured once per set of spans and replayed until the next eviction, its persistence state
    and cross-layer prior refilled in place: with long cycles most retrieving steps are replays too."""
    _compare_replays(dtype, case)


def _compare_replays(dtype, case) -> DecodeGraph:
    """The body of the test above; returns the captured session's :class:`DecodeGraph`."""
    case = dict(case)
    batch = case.pop("batch", 1)
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3).cuda().to(dtype)
    cfg = _config(**case)
    eager = LtriSession(model, cfg.replace(decode_graph=False), batch_size=batch)
    plain = LtriSession(model, cfg, batch_size=batch)
    plain.decode_graph = DecodeGraph(model, plain.cache, plain.cache_kwarg, capture=False)
    captured = LtriSession(model, cfg, batch_size=batch)
    assert captured.decode_graph is not None and captured.decode_graph.capture
    sessions = (eager, plain, captured)
    ids = random_ids(batch, 45, seed=11).cuda()
    logits = [s.feed(ids) for s in sessions]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    agree = 0
    for _ in range(48):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
        torch.testing.assert_close(logits[2], logits[1], atol=0, rtol=0)
        if dtype == torch.float32:
            torch.testing.assert_close(logits[2], logits[0], **tol)
        agree += int((logits[2].argmax(-1) == logits[0].argmax(-1)).all())
    assert agree >= 44
    graph = captured.decode_graph
    assert graph.replays >= 20 and graph.steps == plain.decode_graph.steps
    assert graph.retrieving_steps == plain.decode_graph.retrieving_steps
    if cfg.mode == "streaming" or cfg.kv_offload is True:  # no device selection: only the reuse graph
        assert graph.captures == 1 and graph.retrieving_steps == 0
    elif cfg.mode == "ltri":  # (InfLLM's 128-token blocks: no span is stored in this short run)
        assert graph.retrieving_steps >= 48 // (2 * cfg.decode_retrieval_stride)
    if cfg.evict_stride >= 24:
        assert graph.retrieving_replays >= graph.retrieving_steps // 2
    assert graph.direct_capture_failures == 0  # span sets after the first were captured at their first step
    for a, b in zip(plain.cache.global_states, captured.cache.global_states):
        torch.testing.assert_close(b.win_k, a.win_k, atol=0, rtol=0)
        torch.testing.assert_close(b.win_mass, a.win_mass, atol=0, rtol=0)
        for ta, tb in zip(a.tables, b.tables):
            torch.testing.assert_close(tb.recency, ta.recency, atol=0, rtol=0)
    if plain.cache.consensus is not None:
        for pa, pb in zip(plain.cache.consensus.prior, captured.cache.consensus.prior):
            assert (pa is None) == (pb is None)
            if pa is not None:
                torch.testing.assert_close(pb, pa, atol=0, rtol=0)
    return graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(evict_stride=24, decode_retrieval_stride=1),
                                  dict(batch=2, evict_stride=30, decode_retrieval_stride=1, voting=True,
                                       retrieval_scope="per_kv_head"),
                                  dict(evict_stride=24, decode_retrieval_stride=1, kv_device_gib=1e-9,
                                       zero_copy_host_pages=True)],
                         ids=["ltri-stride1", "batch2-voting-per-kv-head", "ltri-host-tier-read-in-graph"])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_evicting_steps_replayed(dtype, case, monkeypatch) -> None:
    """``decode_graph.REPLAY_EVICTING_STEPS``: the last retrieving step of an eviction cycle replays the graph of
    its span set (its pool slots are reserved after the forward) instead of running eagerly; the replays stay
    bit-for-bit the uncaptured graph form, through the evictions that follow them."""
    from ltri_rag import decode_graph

    monkeypatch.setattr(decode_graph, "REPLAY_EVICTING_STEPS", True)
    graph = _compare_replays(dtype, case)
    assert graph.evicting_replays >= 1


def _decodes_eagerly_after_a_failed_capture(match: str, steps: int) -> None:
    """An eager session and a graph-enabled one decode the same tokens; the capture fails (the caller patched it):
    a warning matching ``match``, the graph dropped, and every step's logits the eager session's."""
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3).cuda()
    cfg = _config()
    eager = LtriSession(model, cfg.replace(decode_graph=False))
    captured = LtriSession(model, cfg)
    ids = random_ids(1, 45, seed=11).cuda()
    logits = [s.feed(ids) for s in (eager, captured)]
    with pytest.warns(RuntimeWarning, match=match):
        for _ in range(steps):
            token = logits[0].argmax(-1)
            logits = [s.step(token) for s in (eager, captured)]
            torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert captured.decode_graph is None


def test_capture_failure_falls_back_to_eager_steps(monkeypatch) -> None:
    """If capturing fails, the session warns, drops the graph and decodes eagerly from the same state."""

    def broken(self):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(DecodeGraph, "_capture_graph", broken)
    _decodes_eagerly_after_a_failed_capture("capture refused", 12)


def test_a_host_sync_inside_the_captured_step_falls_back_cleanly(monkeypatch) -> None:
    """A model whose forward reads a value back to the host cannot be captured: the capture fails for real (CUDA
    refuses the synchronisation while the stream is capturing), the session warns and goes on eagerly from the
    same state, with the eager session's logits."""
    from ltri_rag.layer import GlobalLayerState

    original = GlobalLayerState._attend_graph

    def syncing(self, q, *args, **kwargs):
        float(q.sum())  # a read-back: fine eagerly, refused while capturing
        return original(self, q, *args, **kwargs)

    monkeypatch.setattr(GlobalLayerState, "_attend_graph", syncing)
    _decodes_eagerly_after_a_failed_capture("capturing a decode step failed", 16)
    torch.cuda.synchronize()  # the device is still usable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [dict(evict_stride=24, decode_retrieval_stride=2),
                                  dict(batch=2, evict_stride=30, decode_retrieval_stride=3, voting=True,
                                       retrieval_scope="per_kv_head"),
                                  dict(evict_stride=24, decode_retrieval_stride=1, kv_device_gib=1e-9,
                                       zero_copy_host_pages=True)],
                         ids=["ltri-long-cycles", "batch2-voting-per-kv-head", "ltri-host-tier-read-in-graph"])
@pytest.mark.parametrize("fused", [True, False], ids=["one-launch-assembly", "torch-assembly"])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_replayed_steps_with_either_device_assembly(fused, dtype, case, monkeypatch) -> None:
    """The same comparison with ``layer_assembly.FUSED_DEVICE_ASSEMBLY`` set each way: on (the default), the
    retrieving steps build their memory part in one Triton launch per sequence (compiled here); off, by torch
    operations. Either replays bit-for-bit the uncaptured graph form and the eager steps (which select on the host)
    to float rounding, and the one-launch kernel runs exactly when the switch is on."""
    from ltri_rag import layer_assembly

    kernel = layer_assembly.assemble_memory
    launches = []

    def counted(*args, **kwargs):
        launches.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(layer_assembly, "FUSED_DEVICE_ASSEMBLY", fused)
    monkeypatch.setattr(layer_assembly, "assemble_memory", counted)
    test_replayed_steps_equal_the_uncaptured_graph_form_and_the_eager_steps(dtype, case)
    assert bool(launches) == fused  # the switch chose the path that built the retrieving steps' memory part
