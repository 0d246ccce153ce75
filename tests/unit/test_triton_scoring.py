"""The Triton ``span_probabilities`` equals the torch reference (float32, random inputs, awkward sizes).

Without CUDA the kernels run on CPU tensors under the Triton interpreter: ``TRITON_INTERPRET`` is set here, at
import, before triton (and the kernel module, whose kernels Triton builds at import) is loaded. With CUDA the same
cases run compiled on the GPU. Skipped where triton does not import.
"""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_scoring = kernel_module("triton_scoring")

from ltri_rag.kernels.scoring import span_probabilities


span_probabilities_triton = triton_scoring.span_probabilities_triton


def _inputs(num_heads, num_kv_heads, q_len, head_dim, counts, dtype=torch.float32, seed=0):
    """Queries ``[H, q_len, D]`` and index vectors with ``counts[s]`` vectors for span ``s``, in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    owner = owner[torch.randperm(owner.numel(), generator=gen)]
    queries = torch.randn(num_heads, q_len, head_dim, generator=gen)
    vectors = torch.randn(owner.numel(), num_kv_heads, head_dim, generator=gen)
    return queries.to(DEVICE, dtype), vectors.to(DEVICE, dtype), owner.to(DEVICE)


def _counts(num_spans, width, seed=0, empty_every=0):
    """Vector counts in ``1 .. width`` per span; every ``empty_every``-th span (if > 0) has none."""
    gen = torch.Generator().manual_seed(seed + 100)
    counts = torch.randint(1, width + 1, (num_spans,), generator=gen)
    if empty_every:
        counts[::empty_every] = 0
    return counts.tolist()


def _check(queries, vectors, owner, num_spans, scaling, *, atol=1e-5, **kwargs):
    got = span_probabilities_triton(queries, vectors, owner, num_spans, scaling, **kwargs)
    ref = span_probabilities(queries.float(), vectors.float(), owner, num_spans, scaling)
    assert got.shape == ref.shape == (queries.shape[0], num_spans) and got.dtype == torch.float32
    assert got.device == queries.device
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    return got


# (num_heads, num_kv_heads, q_len, head_dim, num_spans, max_width, empty_every)
CASES = [
    (2, 2, 5, 32, 1, 3, 0),  # MHA (G=1), a single span
    (4, 2, 37, 32, 45, 4, 7),  # G=2, lengths not multiples of the blocks, some spans empty
    (14, 2, 19, 64, 40, 8, 5),  # Qwen-like G=7, D=64, widths up to 8
    (7, 1, 1, 48, 70, 5, 9),  # decode (q_len 1), G=7, head_dim 48 (padded to 64), width 5
    (3, 3, 9, 32, 33, 1, 0),  # width 1: one vector per span
    (8, 2, 16, 16, 64, 2, 3),  # lengths exact multiples of the blocks, D=16
    (2, 1, 40, 24, 50, 6, 4),  # G=2 over one KV head, head_dim 24
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}kv{}q{}D{}S{}w{}e{}".format(*c))
def test_matches_reference(case) -> None:
    num_heads, num_kv_heads, q_len, head_dim, num_spans, width, empty_every = case
    counts = _counts(num_spans, width, seed=num_heads, empty_every=empty_every)
    queries, vectors, owner = _inputs(num_heads, num_kv_heads, q_len, head_dim, counts, seed=q_len)
    got = _check(queries, vectors, owner, num_spans, head_dim ** -0.5 * 2.0)
    empty = torch.tensor(counts, device=DEVICE) == 0
    assert (got[:, empty] == 0).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(num_heads, device=DEVICE))


# decoded tokens (one query): one pass writing the scores, then a softmax
# (num_heads, num_kv_heads, head_dim, num_spans, max_width, empty_every)
ONE_QUERY_CASES = [
    (4, 1, 32, 33, 4, 5),  # G=4 over one KV head, spans not a multiple of the tile, some without vectors
    (32, 8, 128, 70, 6, 0),  # Llama-3-8B heads
    (14, 2, 64, 17, 8, 3),  # Qwen-like G=7 (padded to 8 rows of a head group)
    (2, 2, 24, 5, 1, 0),  # MHA (16 rows for one head), head_dim 24, width 1
]


@pytest.mark.parametrize("case", ONE_QUERY_CASES, ids=lambda c: "H{}kv{}D{}S{}w{}e{}".format(*c))
def test_one_query_matches_reference(case) -> None:
    num_heads, num_kv_heads, head_dim, num_spans, width, empty_every = case
    counts = _counts(num_spans, width, seed=num_spans, empty_every=empty_every)
    queries, vectors, owner = _inputs(num_heads, num_kv_heads, 1, head_dim, counts, seed=num_spans)
    for block_s in (None, 16):
        got = _check(queries, vectors, owner, num_spans, head_dim ** -0.5 * 3.0, block_s=block_s)
        assert (got[:, torch.tensor(counts, device=DEVICE) == 0] == 0).all()
        torch.testing.assert_close(got.sum(dim=1), torch.ones(num_heads, device=DEVICE))


def test_one_query_reads_a_kept_layout_and_skips_the_two_passes(monkeypatch) -> None:
    """A kept layout wider than its spans need (padding rows) is read as it is; the two-pass kernels do not run."""
    from ltri_rag.kernels.scoring import span_layout

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("a two-pass kernel ran for one query")

    monkeypatch.setattr(triton_scoring, "_span_stats_kernel", Refuse())
    monkeypatch.setattr(triton_scoring, "_span_mass_kernel", Refuse())
    counts = _counts(29, 3, seed=9, empty_every=4)
    queries, vectors, owner = _inputs(8, 2, 1, 32, counts, seed=9)
    layout = span_layout(vectors, owner.cpu(), 29, dtype=torch.float32, min_width=6)
    assert layout[2] == 6
    _check(queries, vectors, owner, 29, 0.4, layout=layout)
    _check(queries.transpose(0, 1).contiguous().transpose(0, 1), vectors, owner, 29, -0.3)  # strides, sign
    # spans but no vector at all: NaN rows, as the reference's softmax over -inf only
    got = span_probabilities_triton(queries, vectors[:0], owner[:0], 3, 0.5)
    torch.testing.assert_close(got, span_probabilities(queries, vectors[:0], owner[:0], 3, 0.5), equal_nan=True)


def test_small_blocks_and_splits() -> None:
    """Rows that split the group (block_m 16, G=7: 2 queries a block), several span tiles per split, and both
    passes split (span shares combined by logsumexp, query shares summed), scores stored or recomputed."""
    counts = _counts(50, 3, empty_every=6)
    queries, vectors, owner = _inputs(7, 1, 9, 32, counts, seed=1)
    for span_splits, query_splits in [(1, 1), (2, 3), (100, 100)]:
        for score_buffer in (None, 0):
            _check(queries, vectors, owner, 50, 0.25, block_m=16, block_s=16, span_splits=span_splits,
                   query_splits=query_splits, score_buffer=score_buffer)


class _Recording:
    """Stands in for a kernel: records the keyword arguments (launch settings, compile-time sizes) of each launch,
    then runs it."""

    def __init__(self, kernel, launches=None):
        self.kernel, self.launches = kernel, [] if launches is None else launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=["g2", "g7", "g2-one-kv"])
def test_stored_scores_in_slabs_equal_recomputed(case, monkeypatch) -> None:
    """A chunk's scores stored once and read back (the default) give the reference, as do slabs of the queries
    when the buffer is small (each slab's mass added to the last: slabs not dividing ``q_len``) and the
    recomputing path (``score_buffer=0``, no mass-from-scores launch)."""
    num_heads, num_kv_heads, q_len, head_dim, num_spans, width, empty_every = case
    counts = _counts(num_spans, width, seed=11, empty_every=empty_every)
    queries, vectors, owner = _inputs(num_heads, num_kv_heads, q_len, head_dim, counts, seed=11)
    block_q = 16 // min(triton_scoring.triton.next_power_of_2(num_heads // num_kv_heads), 16)
    row_bytes = 4 * num_heads * num_spans  # one query's scores, all heads
    results = {}
    cases = [(None, 1), (1, -(-q_len // block_q)), (3 * block_q * row_bytes, -(-q_len // (3 * block_q))), (0, 0)]
    for score_buffer, slabs in cases:  # (budget, stored-score launches; 0: the recomputing path)
        stored = _Recording(triton_scoring._span_mass_stored_kernel)
        recomputed = _Recording(triton_scoring._span_mass_kernel)
        monkeypatch.setattr(triton_scoring, "_span_mass_stored_kernel", stored)
        monkeypatch.setattr(triton_scoring, "_span_mass_kernel", recomputed)
        results[score_buffer] = _check(queries, vectors, owner, num_spans, 0.3, block_m=16, block_s=16,
                                       score_buffer=score_buffer)
        counts = (len(stored.launches), len(recomputed.launches))
        assert counts == ((slabs, 0) if slabs else (0, 1)), score_buffer
        monkeypatch.undo()
    for got in results.values():
        torch.testing.assert_close(got, results[None], atol=1e-6, rtol=0)


@pytest.mark.parametrize("load_padding", [True, False], ids=["padding-loaded", "padding-masked"])
@pytest.mark.parametrize("q_len", [9, 1], ids=["chunk", "one-query"])
def test_slot_loads_with_or_without_the_padding(q_len, load_padding, monkeypatch) -> None:
    """``scoring_launch.CHUNK_LOAD_PADDING`` / ``DECODE_LOAD_PADDING``: a slot's rows read for every span or only
    where a vector is. Either way a padding row is dropped from the span max: NaN padding of a kept layout (float
    and int8 codes with NaN scales) leaves the result equal to the reference."""
    from ltri_rag.kernels import scoring_launch
    from ltri_rag.kernels.scoring import span_layout

    monkeypatch.setattr(scoring_launch, "CHUNK_LOAD_PADDING", load_padding)
    monkeypatch.setattr(scoring_launch, "DECODE_LOAD_PADDING", load_padding)
    counts = _counts(37, 4, seed=12, empty_every=5)
    queries, vectors, owner = _inputs(8, 2, q_len, 32, counts, seed=12)
    layout = span_layout(vectors, owner.cpu(), 37, dtype=torch.float32, min_width=5)
    padded = layout.padded.clone()
    padded[~layout.valid] = float("nan")
    _check(queries, vectors, owner, 37, 0.3, layout=layout._replace(padded=padded))
    codes = span_layout(vectors, owner.cpu(), 37, quantize=True)
    scale = codes.scale.clone()
    scale[~codes.valid] = float("nan")
    got = span_probabilities_triton(queries, vectors, owner, 37, 0.3, layout=codes._replace(scale=scale))
    torch.testing.assert_close(got, span_probabilities(queries, vectors, owner, 37, 0.3, layout=codes),
                               atol=1e-5, rtol=0)


def test_chunk_launch_settings_reach_the_kernels(monkeypatch) -> None:
    """Explicit ``num_warps`` / ``num_stages`` are the chunk kernels' launch settings (they were once dropped for
    ``block_sizes``' values); None takes ``block_sizes``'."""
    launches = []
    for name in ("_span_stats_kernel", "_span_mass_kernel"):
        monkeypatch.setattr(triton_scoring, name, _Recording(getattr(triton_scoring, name), launches))
    counts = _counts(20, 3, seed=13)
    queries, vectors, owner = _inputs(4, 2, 7, 32, counts, seed=13)

    def settings():
        return [(kwargs["num_warps"], kwargs["num_stages"]) for kwargs in launches]

    for score_buffer, kernels in ((None, 1), (0, 2)):
        launches.clear()
        _check(queries, vectors, owner, 20, 0.3, num_warps=2, num_stages=3, score_buffer=score_buffer)
        assert settings() == [(2, 3)] * kernels
        launches.clear()
        _check(queries, vectors, owner, 20, 0.3, score_buffer=score_buffer)
        assert settings() == [triton_scoring.block_sizes(32, 2, queries.device, torch.float32)[2:]] * kernels


def test_peaked_scores_and_negative_scaling() -> None:
    """Large scores (softmax dominated by one span, exp underflowing elsewhere) and a negative scaling (the max is
    taken after scaling, as in the reference)."""
    counts = _counts(30, 3, seed=2)
    queries, vectors, owner = _inputs(4, 2, 11, 32, counts, seed=2)
    _check(queries, vectors, owner, 30, 3.0)
    _check(queries, vectors, owner, 30, -0.4)


def test_strided_queries() -> None:
    """Queries as a transpose of a ``[q_len, H, D]`` buffer (not contiguous) are read through their strides."""
    counts = _counts(20, 4, seed=3)
    queries, vectors, owner = _inputs(6, 2, 13, 32, counts, seed=3)
    strided = queries.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    _check(strided, vectors, owner, 20, 0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype) -> None:
    """16-bit queries and vectors: products of 16-bit values are exact in float32, so the result is the float32
    reference on the same rounded values up to the order of the additions."""
    counts = _counts(25, 5, seed=4, empty_every=8)
    queries, vectors, owner = _inputs(14, 2, 10, 64, counts, dtype=dtype, seed=4)
    _check(queries, vectors, owner, 25, 0.125)
    _check(queries, vectors.float(), owner, 25, 0.125)  # mixed dtypes: computed in float32


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's -inf - -inf
def test_empty_shapes_and_spans_without_vectors() -> None:
    queries, vectors, owner = _inputs(4, 2, 6, 32, [2, 1], seed=5)
    none = span_probabilities_triton(queries, vectors[:0], owner[:0], 0, 0.5)
    assert none.shape == (4, 0) and none.dtype == torch.float32
    # spans but not a single vector: every score is -inf, the softmax undefined (NaN), as in the reference
    for score_buffer in (None, 0):  # scores stored or recomputed
        got = span_probabilities_triton(queries, vectors[:0], owner[:0], 3, 0.5, score_buffer=score_buffer)
        torch.testing.assert_close(got, span_probabilities(queries, vectors[:0], owner[:0], 3, 0.5),
                                   equal_nan=True)
    # the last spans have no vectors
    got = _check(queries, vectors, owner, 5, 0.5)
    assert (got[:, 2:] == 0).all()


def test_dispatch() -> None:
    counts = _counts(12, 3, seed=6, empty_every=5)
    queries, vectors, owner = _inputs(4, 2, 9, 32, counts, seed=6)
    ref = span_probabilities(queries, vectors, owner, 12, 0.3)
    for backend in ("triton", "auto"):  # auto: Triton on CUDA, the torch path on CPU
        got = span_probabilities(queries, vectors, owner, 12, 0.3, backend=backend)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'nope'"):
        span_probabilities(queries, vectors, owner, 12, 0.3, backend="nope")

    from ltri_rag.kernels import span_probabilities_triton as exported

    assert exported.__name__ == "span_probabilities_triton"


def test_auto_on_cpu_uses_the_torch_path(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the Triton scorer ran")

    monkeypatch.setattr(triton_scoring, "span_probabilities_triton", fail)
    queries, vectors, owner = _inputs(2, 1, 3, 16, [1, 2], seed=7)
    span_probabilities(queries.cpu(), vectors.cpu(), owner.cpu(), 2, 1.0, backend="auto")
    span_probabilities(queries.cpu(), vectors.cpu(), owner.cpu(), 2, 1.0)  # the default is torch


def test_auto_takes_triton_on_cuda_for_chunks_and_single_queries(monkeypatch) -> None:
    """``auto`` takes Triton for CUDA queries, a chunk or a decoded token's single query (the one-query kernel; the
    torch path again with ``AUTO_ONE_QUERY_TRITON`` off); ``triton`` always does, CPU tensors never under ``auto``,
    nor CUDA tensors of a GPU before compute capability 8.0."""
    from ltri_rag.kernels import attention, scoring
    from ltri_rag.kernels.scoring import scoring_uses_triton

    monkeypatch.setattr(attention, "_capability", lambda index: (9, 0))

    class FakeCuda:  # shape and device are all the rule reads
        def __init__(self, q_len):
            self.shape, self.device = (4, q_len, 16), torch.device("cuda", 0)

        def dim(self):
            return 3

    assert scoring_uses_triton("auto", FakeCuda(2048)) and scoring_uses_triton("auto", FakeCuda(2))
    assert scoring_uses_triton("auto", FakeCuda(1))
    monkeypatch.setattr(scoring, "AUTO_ONE_QUERY_TRITON", False)
    assert not scoring_uses_triton("auto", FakeCuda(1)) and scoring_uses_triton("auto", FakeCuda(2))
    assert scoring_uses_triton("triton", FakeCuda(1)) and scoring_uses_triton("triton", torch.zeros(4, 1, 16))
    assert not scoring_uses_triton("auto", torch.zeros(4, 9, 16)) and not scoring_uses_triton("torch", FakeCuda(9))
    monkeypatch.setattr(attention, "_capability", lambda index: (7, 5))  # a Turing GPU: the torch path
    assert not scoring_uses_triton("auto", FakeCuda(2048)) and scoring_uses_triton("triton", FakeCuda(2048))


def test_bad_inputs_raise() -> None:
    queries, vectors, owner = _inputs(4, 2, 5, 32, [2, 1, 3], seed=8)
    with pytest.raises(ValueError, match=r"queries must be \[num_heads, q_len, head_dim\]"):
        span_probabilities_triton(queries[0], vectors, owner, 3, 1.0)
    with pytest.raises(ValueError, match=r"disagree on num_vectors"):
        span_probabilities_triton(queries, vectors, owner[:-1], 3, 1.0)
    with pytest.raises(ValueError, match=r"do not fit vectors"):
        span_probabilities_triton(queries[:3], vectors, owner, 3, 1.0)
    with pytest.raises(ValueError, match="num_spans must be >= 0, got -1"):
        span_probabilities_triton(queries, vectors, owner, -1, 1.0)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16, got 24"):
        span_probabilities_triton(queries, vectors, owner, 3, 1.0, block_m=24)
    with pytest.raises(ValueError, match="block_s must be a power of two >= 16, got 8"):
        span_probabilities_triton(queries, vectors, owner, 3, 1.0, block_s=8)
    with pytest.raises(ValueError, match="span_splits must be >= 1, got 0"):
        span_probabilities_triton(queries, vectors, owner, 3, 1.0, span_splits=0)
    with pytest.raises(ValueError, match="query_splits must be >= 1, got 0"):
        span_probabilities_triton(queries, vectors, owner, 3, 1.0, query_splits=0)
    with pytest.raises(ValueError, match="score_buffer must be >= 0 bytes, got -1"):
        span_probabilities_triton(queries, vectors, owner, 3, 1.0, score_buffer=-1)
    with pytest.raises(ValueError, match="num_warps must be a power of two >= 1, got 3"):
        span_probabilities_triton(queries, vectors, owner, 3, 1.0, num_warps=3)
    with pytest.raises(ValueError, match="num_stages must be >= 1, got 0"):
        span_probabilities_triton(queries[:, :1], vectors, owner, 3, 1.0, num_stages=0)
    with pytest.raises(ValueError, match="head_dim 512"):
        big_q, big_v, big_o = _inputs(2, 1, 1, 512, [1], seed=8)
        span_probabilities_triton(big_q, big_v, big_o, 1, 1.0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_retrieval_through_the_triton_scorer(family, monkeypatch) -> None:
    """``attention_backend="triton"`` also routes span scoring (``span_scoring="softmax"``, ltri's default)
    through the Triton kernels: same logits as the torch backend through prefill and decode, and the Triton
    scorer did run, on tables with spans."""
    from ltri_rag import LtriConfig, LtriSession
    from tests.unit.tiny_models import random_ids, tiny_model

    calls = []
    kernel = triton_scoring.span_probabilities_triton

    def spy(queries, vectors, owner, num_spans, scaling, **kwargs):
        calls.append(num_spans)
        return kernel(queries, vectors, owner, num_spans, scaling, **kwargs)

    monkeypatch.setattr(triton_scoring, "span_probabilities_triton", spy)
    num_heads, num_kv_heads = (4, 2) if family == "llama" else (4, 1)
    model = tiny_model(family, num_heads=num_heads, num_kv_heads=num_kv_heads).to(DEVICE)
    common = {"mode": "ltri", "span_scoring": "softmax", "num_sink_tokens": 3, "local_window": 16, "chunk_size": 8,
              "budget": 24, "page_size": 5, "evict_stride": 4, "span_min_len": 2, "span_max_len": 12}
    sessions = [LtriSession(model, LtriConfig(**common, attention_backend=b)) for b in ("torch", "triton")]
    ids = random_ids(1, 56).to(DEVICE)
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert sessions[1].cache.memory_tokens() == sessions[0].cache.memory_tokens() > 0
    for _ in range(2):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert calls and max(calls) > 1
