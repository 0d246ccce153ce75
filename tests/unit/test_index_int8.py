"""Index vectors kept as int8 codes (``LtriConfig.index_precision="int8"``): the rounding's bound, the layout, the
span table, scoring (torch and Triton agree with scoring the dequantised vectors), and the engine end to end."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig
from ltri_rag.kernels.scoring import (SpanLayout, dequantize_rows, quantize_rows, span_layout, span_probabilities,
                                      span_scores)
from ltri_rag.span_memory import SpanTable
from tests.unit.triton_modules import DEVICE, kernel_module


def _vectors(n: int, heads: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, dim, generator=gen) * torch.logspace(-2, 1, n)[:, None, None]


def test_codes_are_within_half_a_step_of_each_vectors_grid() -> None:
    x = _vectors(40, 3, 24)
    x[5, 1] = 0.0  # a zero vector: scale 0, codes 0, no division by zero
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (40, 3)
    assert scale[5, 1] == 0 and not codes[5, 1].any()
    assert int(codes.abs().amax()) == 127  # each vector's largest coordinate takes the top code
    error = (dequantize_rows(codes, scale) - x).abs()
    assert (error <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert dequantize_rows(codes, scale, torch.bfloat16).dtype == torch.bfloat16


def test_int8_layout_holds_the_codes_of_the_float_layout_rows() -> None:
    vectors = _vectors(9, 2, 8, seed=1)
    owner = torch.tensor([2, 0, 0, 1, 2, 2, 0, 2, 1])
    plain = span_layout(vectors, owner, 4)
    packed = span_layout(vectors, owner, 4, quantize=True)
    assert isinstance(packed, SpanLayout) and plain.scale is None
    assert packed.padded.dtype == torch.int8 and packed.width == plain.width == 4
    assert torch.equal(packed.valid, plain.valid)
    codes, scale = quantize_rows(plain.padded)
    assert torch.equal(packed.padded, codes) and torch.equal(packed.scale, scale)
    assert not packed.scale[~packed.valid].any()  # padding rows (span 3 has no vector) have scale 0


def test_int8_scoring_is_scoring_the_dequantised_vectors() -> None:
    gen = torch.Generator().manual_seed(2)
    vectors = _vectors(30, 2, 16, seed=2)
    owner = torch.randint(0, 7, (30,), generator=gen)
    packed = span_layout(vectors, owner, 7, quantize=True)
    dequant = SpanLayout(dequantize_rows(packed.padded, packed.scale), packed.valid, packed.width)
    queries = torch.randn(6, 5, 16, generator=gen)
    got = span_probabilities(queries, None, None, 7, 0.25, layout=packed)
    ref = span_probabilities(queries, None, None, 7, 0.25, layout=dequant)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(span_scores(queries[:, 0], None, None, 7, layout=packed),
                               span_scores(queries[:, 0], None, None, 7, layout=dequant), atol=1e-5, rtol=1e-6)
    # and it is an approximation of the float scores, not something else
    exact = span_probabilities(queries, vectors, owner, 7, 0.25)
    assert (got - exact).abs().max() < 0.02


def test_span_table_quantises_appends_and_widens() -> None:
    table = SpanTable(2, 8, torch.float32, torch.device("cpu"), quantized=True)
    first, second = _vectors(5, 2, 8, seed=3), _vectors(7, 2, 8, seed=4)
    table.append(torch.tensor([0, 10]), torch.tensor([10, 16]), first, torch.tensor([0, 0, 1, 1, 1]))
    table.append(torch.tensor([16]), torch.tensor([30]), second, torch.zeros(7, dtype=torch.int64))  # widens 3 -> 7
    layout = table.layout()
    assert layout.width == 7 and layout.padded.dtype == torch.int8 and layout.padded.shape == (21, 2, 8)
    expected = span_layout(torch.cat([first, second]), torch.tensor([0, 0, 1, 1, 1] + [2] * 7), 3, quantize=True)
    assert torch.equal(layout.padded, expected.padded) and torch.equal(layout.scale, expected.scale)
    assert torch.equal(layout.valid, expected.valid)
    back = table.vectors  # dequantised, in the table's dtype, grouped by span
    assert back.dtype == torch.float32 and back.shape == (12, 2, 8)
    assert ((back - torch.cat([first, second])).abs() <= layout.scale[layout.valid][..., None] / 2 + 1e-6).all()


# (num_heads, num_kv_heads, q_len, head_dim, num_spans, max_width)
TRITON_CASES = [(4, 2, 37, 32, 45, 4), (14, 2, 19, 64, 40, 8), (7, 1, 1, 48, 70, 5), (8, 2, 1, 16, 300, 3)]


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_int8_scoring_equals_torch(case, dtype) -> None:
    triton_scoring = kernel_module("triton_scoring")
    num_heads, num_kv_heads, q_len, head_dim, num_spans, max_width = case
    gen = torch.Generator().manual_seed(num_spans)
    counts = torch.randint(0, max_width + 1, (num_spans,), generator=gen)
    counts[0] = max_width
    owner = torch.repeat_interleave(torch.arange(num_spans), counts)
    vectors = torch.randn(owner.numel(), num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    queries = torch.randn(num_heads, q_len, head_dim, generator=gen).to(DEVICE, dtype)
    packed = span_layout(vectors, owner.to(DEVICE), num_spans, quantize=True)
    got = triton_scoring.span_probabilities_triton(queries, None, None, num_spans, 0.3, layout=packed)
    ref = span_probabilities(queries.float(), None, None, num_spans, 0.3, layout=packed)
    if counts.eq(0).any():
        ref = torch.nan_to_num(ref)  # (rows are never empty here; spans without vectors get 0 on both sides)
    torch.testing.assert_close(got, ref, atol=2e-5 if dtype == torch.float32 else 2e-3, rtol=0)


def test_engine_with_int8_vectors_is_exact_when_everything_fits_and_chooses_from_int8_codes() -> None:
    """With a budget that holds every span the scores choose nothing, so the int8 engine is exact (equal to the
    unmodified model); with a small budget it must choose (the logits leave the unmodified model's), and it chooses
    from span tables that hold int8 codes. That int8 scores rank like the float ones is checked per kernel above."""
    from ltri_rag import LtriSession
    from ltri_rag.layer import GlobalLayerState
    from tests.unit.tiny_models import exact_config, greedy_logits, random_ids, reference_logits, tiny_model

    model = tiny_model("llama")
    ids = random_ids(1, 60)
    session = LtriSession(model, exact_config("ltri", 7, index_precision="int8"))
    logits = greedy_logits(session, ids[:, :52], 0)[0]
    torch.testing.assert_close(logits, reference_logits(model, ids[:, :52])[:, -1], atol=2e-4, rtol=0)
    tables = [t for s in session.cache.states if isinstance(s, GlobalLayerState) for t in s.tables]
    assert tables and all(t.quantized and len(t) > 0 for t in tables)
    assert all(t.layout().padded.dtype == torch.int8 and t.layout().scale is not None for t in tables)
    for step in range(52, 60):  # decoding (each token retrieves) stays exact too
        got = session.step(ids[:, step])
        torch.testing.assert_close(got, reference_logits(model, ids[:, :step + 1])[:, -1], atol=2e-4, rtol=0)
    chosen = LtriSession(model, exact_config("ltri", 7, index_precision="int8", budget=8))
    last = greedy_logits(chosen, ids[:, :52], 0)[0]
    assert torch.isfinite(last).all()
    assert (last - reference_logits(model, ids[:, :52])[:, -1]).abs().max() > 1e-3  # the budget bites
    tables = [t for s in chosen.cache.states if isinstance(s, GlobalLayerState) for t in s.tables]
    assert tables and all(t.quantized and t.layout().padded.dtype == torch.int8 for t in tables)
