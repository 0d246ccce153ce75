"""On CUDA: the compiled Triton ``span_probabilities`` against the float32 torch reference at model-like sizes.

Qwen2.5-0.5B heads (14 query / 2 KV heads, head_dim 64), 4,000 spans of 4-8 index vectors (some spans empty), a
prefill chunk of 2,048 queries and a decode step; plus head_dim 128 / 256 layers. 16-bit queries and vectors of the
same dtype are multiplied in that dtype with float32 accumulation (exact products), so they are compared with the
float32 reference on the same rounded values at float32 tolerances; mixed dtypes and float32 are computed in float32
(IEEE). A TF32 run (torch's ``allow_tf32`` set) is only checked loosely. Skipped without a GPU.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (num_heads, num_kv_heads, head_dim, num_spans, min_width, max_width, q_len)
CASES = [
    (14, 2, 64, 4000, 4, 8, 2048),  # Qwen2.5-0.5B, a prefill chunk
    (14, 2, 64, 4000, 4, 8, 1),  # Qwen2.5-0.5B, decode
    (14, 2, 64, 1000, 1, 1, 300),  # width 1
    (32, 8, 128, 2000, 4, 8, 512),  # Llama-3-8B heads
    (8, 4, 256, 777, 2, 6, 129),  # head_dim 256, odd sizes
    (28, 4, 128, 4000, 4, 8, 1),  # G=7 at head_dim 128, decode
]


def _kernel():
    pytest.importorskip("triton")
    from ltri_rag.kernels import triton_scoring

    if triton_scoring.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")
    return triton_scoring.span_probabilities_triton


def _inputs(num_heads, num_kv_heads, head_dim, num_spans, min_width, max_width, q_len, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    counts = torch.randint(min_width, max_width + 1, (num_spans,), device="cuda", generator=gen)
    counts[::37] = 0  # some spans without vectors
    owner = torch.repeat_interleave(torch.arange(num_spans, device="cuda"), counts)
    queries = torch.randn(num_heads, q_len, head_dim, device="cuda", generator=gen) * 2.0
    vectors = torch.randn(owner.numel(), num_kv_heads, head_dim, device="cuda", generator=gen)
    return queries, vectors, owner


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
                         ids=lambda d: f"q{str(d[0])[6:]}-v{str(d[1])[6:]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}kv{}D{}S{}w{}-{}q{}".format(*c))
def test_matches_reference_on_cuda(case, dtypes) -> None:
    from ltri_rag.kernels.scoring import span_probabilities

    span_probabilities_triton = _kernel()
    queries, vectors, owner = _inputs(*case)
    queries, vectors = queries.to(dtypes[0]), vectors.to(dtypes[1])
    num_spans, scaling = case[3], case[2] ** -0.5
    assert not torch.backends.cuda.matmul.allow_tf32
    got = span_probabilities_triton(queries, vectors, owner, num_spans, scaling)
    ref = span_probabilities(queries.float(), vectors.float(), owner, num_spans, scaling)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(case[0], device="cuda"), atol=1e-4, rtol=0)
    assert (got[:, ::37] == 0).all()
    # the engine's entry point routes there
    via = span_probabilities(queries, vectors, owner, num_spans, scaling, backend="triton")
    torch.testing.assert_close(via, got, atol=0, rtol=0)


def test_tf32_when_torch_allows_it(monkeypatch) -> None:
    from ltri_rag.kernels.scoring import span_probabilities

    span_probabilities_triton = _kernel()
    queries, vectors, owner = _inputs(14, 2, 64, 2000, 4, 8, 256, seed=1)
    ref = span_probabilities(queries, vectors, owner, 2000, 0.125)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    got = span_probabilities_triton(queries, vectors, owner, 2000, 0.125)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=5e-2)


def test_splits_and_blocks_agree() -> None:
    """The default split heuristics and explicit splits / block sizes give the same result."""
    span_probabilities_triton = _kernel()
    queries, vectors, owner = _inputs(14, 2, 64, 3001, 4, 8, 333, seed=2)
    queries, vectors = queries.bfloat16(), vectors.bfloat16()
    base = span_probabilities_triton(queries, vectors, owner, 3001, 0.125)
    for kwargs in [{"span_splits": 1, "query_splits": 1}, {"span_splits": 7, "query_splits": 3},
                   {"block_m": 128, "block_s": 32}, {"block_m": 16, "block_s": 128}]:
        got = span_probabilities_triton(queries, vectors, owner, 3001, 0.125, **kwargs)
        torch.testing.assert_close(got, base, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], (32, 8, 128, 16000, 4, 8, 256)],
                         ids=["qwen-chunk", "llama-chunk", "llama-chunk-16k-spans"])
def test_stored_scores_slabs_and_recomputed_agree(case) -> None:
    """A chunk's scores stored once (the default buffer), in slabs of a small buffer (launches in sequence, each
    slab's mass added to the last) and recomputed (``score_buffer=0``): bf16 kept layouts, the float32 reference."""
    from ltri_rag.kernels.scoring import span_layout, span_probabilities

    span_probabilities_triton = _kernel()
    queries, vectors, owner = _inputs(*case, seed=4)
    queries, vectors, num_spans = queries.bfloat16(), vectors.bfloat16(), case[3]
    layout = span_layout(vectors, owner, num_spans, dtype=torch.bfloat16)
    scaling = case[2] ** -0.5
    ref = span_probabilities(queries.float(), vectors.float(), owner, num_spans, scaling)
    base = span_probabilities_triton(queries, vectors, owner, num_spans, scaling, layout=layout)
    torch.testing.assert_close(base, ref, atol=1e-5, rtol=1e-4)
    one_query = 4 * case[0] * num_spans  # bytes of one query's scores over all heads
    for score_buffer in (0, 1, 100 * one_query):
        got = span_probabilities_triton(queries, vectors, owner, num_spans, scaling, layout=layout,
                                        score_buffer=score_buffer)
        torch.testing.assert_close(got, base, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=["qwen-decode", "llama-chunk", "g7-decode"])
def test_torch_path_multiplies_half_layouts_without_a_float32_copy(case, dtype) -> None:
    """The plain-torch path given a kept half-precision layout and queries of its dtype multiplies them as they are
    into float32 sums (``bmm(..., out_dtype=float32)``): the float32 path's result on the same values, to float32
    summation-order rounding."""
    from ltri_rag.kernels import scoring

    queries, vectors, owner = _inputs(*case)
    queries, vectors, num_spans = queries.to(dtype), vectors.to(dtype), case[3]
    layout = scoring.span_layout(vectors, owner, num_spans, dtype=dtype)
    scaling = case[2] ** -0.5
    got = scoring.span_probabilities(queries, vectors, owner, num_spans, scaling, layout=layout)
    assert scoring._HALF_MATMUL.get(queries.device) is True  # the half path ran (torch has bmm's out_dtype)
    ref = scoring.span_probabilities(queries.float(), vectors.float(), owner, num_spans, scaling)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], (32, 8, 128, 16000, 4, 8, 1)],
                         ids=["qwen-decode", "g7-decode", "llama-decode-16k-spans"])
def test_one_query_kernel_in_a_cuda_graph(case) -> None:
    """A decoded token's scoring (one pass + softmax, bf16 kept layout) captured in a CUDA graph and replayed with
    new queries equals the eager call and the float32 reference."""
    kernel = _kernel()
    from ltri_rag.kernels.scoring import span_layout, span_probabilities

    queries, vectors, owner = _inputs(*case, seed=3)
    queries, vectors, num_spans = queries.bfloat16(), vectors.bfloat16(), case[3]
    layout = span_layout(vectors, owner, num_spans, dtype=torch.bfloat16)
    scaling = case[2] ** -0.5
    static_q = queries.clone()
    kernel(static_q, vectors, owner, num_spans, scaling, layout=layout)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(static_q, vectors, owner, num_spans, scaling, layout=layout)
    for seed in (4, 5):
        fresh = _inputs(*case, seed=seed)[0].bfloat16()
        static_q.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager = kernel(fresh, vectors, owner, num_spans, scaling, layout=layout)
        assert torch.equal(out, eager)
        ref = span_probabilities(fresh.float(), vectors.float(), owner, num_spans, scaling)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
