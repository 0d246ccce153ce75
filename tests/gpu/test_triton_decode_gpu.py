"""On CUDA: the compiled fused decode attention against the float32 torch composition at model sizes.

Memory = 128 sinks + 2K retrieved keys (some padding) or a long memory (16K / 128K keys), window 4K, Qwen2.5-0.5B
(14 / 2 heads, head_dim 64) and Llama-3-8B (32 / 8, 128) shapes. float32 inputs (IEEE products) must match to
1e-4; bfloat16 / float16 inputs are compared with the float32 composition on the same rounded values (the kernel
rounds ``p`` to the input dtype for ``p @ v``; the statistics come from float32 scores). The 16-bit tolerances are
first estimates, to be confirmed on the GPU. A CUDA-graph capture and replay gives the eager result, also after
the input buffers are refilled. Skipped without a GPU.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (name, batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, band_width, softcap)
CASES = [
    ("qwen-2k", 1, 14, 2, 64, 2048 + 128, 4096, 64, None),
    ("llama-2k", 1, 32, 8, 128, 2048 + 128, 4096, 64, None),
    ("llama-2k-b2-cap", 2, 32, 8, 128, 2048 + 128, 4096, 64, 50.0),
    ("qwen-16k", 1, 14, 2, 64, 16384, 4096, 64, None),
    ("llama-16k", 1, 32, 8, 128, 16384, 4096, 64, None),
    ("qwen-128k", 1, 14, 2, 64, 131072, 4096, 64, None),
    ("llama-128k", 1, 32, 8, 128, 131072, 4096, 0, None),
    ("d256-g4", 1, 16, 4, 256, 3000, 1000, 32, None),
]

TOLERANCES = {  # dtype: (out atol, lse atol, key_mass / band rtol)
    torch.float32: (1e-4, 1e-4, 1e-4),
    torch.float16: (3e-3, 1e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-3, 1e-3),
}


def _module():
    pytest.importorskip("triton")
    from ltri_rag.kernels import triton_decode

    if triton_decode.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")
    return triton_decode


def _captured(call):
    """``(graph, result)``: ``call`` run once on a side stream (compiles, warms the allocator), then captured as a
    CUDA graph whose replays rewrite ``result``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = call()
    return graph, result


def _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    q = randn(batch, num_heads, 1, head_dim)
    mem_k, mem_v = randn(batch, num_kv_heads, mem_len, head_dim), randn(batch, num_kv_heads, mem_len, head_dim)
    win_k, win_v = randn(batch, num_kv_heads, win_len, head_dim), randn(batch, num_kv_heads, win_len, head_dim)
    mem_mask = torch.rand(batch, num_kv_heads, mem_len, device="cuda", generator=gen) > 0.1
    mem_mask[:, :, :128] = True  # sinks
    if batch > 1:
        mem_mask[-1, 0] = False  # a KV head without any valid memory key
    return q, mem_k, mem_v, mem_mask, win_k, win_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_the_float32_composition_on_cuda(case, dtype) -> None:
    td = _module()
    _, batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, band_width, softcap = case
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len,
                                                      dtype)
    args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": True, "softcap": softcap}
    got = td.decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    ref = td.decode_attention(q.float(), mem_k.float(), mem_v.float(), mem_mask, win_k.float(), win_v.float(),
                              **args)
    out_atol, lse_atol, mass_rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.out, ref.out, atol=out_atol, rtol=0)
    torch.testing.assert_close(got.lse, ref.lse, atol=lse_atol, rtol=0)
    torch.testing.assert_close(got.key_mass, ref.key_mass, rtol=mass_rtol, atol=1e-7)
    if band_width:
        torch.testing.assert_close(got.band, ref.band, rtol=mass_rtol, atol=1e-7)


def test_splits_and_blocks_agree_on_cuda() -> None:
    td = _module()
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(2, 32, 8, 128, 9000, 4096, torch.float32, seed=1)
    args = {"scaling": 128 ** -0.5, "band_width": 64, "want_key_mass": True}
    base = td.decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    for kwargs in ({"num_splits": 1}, {"num_splits": 7}, {"num_splits": 256}, {"block_n": 16}, {"block_n": 128}):
        got = td.decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args, **kwargs)
        torch.testing.assert_close(got.out, base.out, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.key_mass, base.key_mass, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(got.band, base.band, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_capture_and_replay(dtype) -> None:
    """The launch has no host sync and shapes-only arguments: it captures into a CUDA graph, the replay equals the
    eager call, and refilling the (static) input buffers changes the replayed result accordingly."""
    td = _module()
    inputs = _inputs(1, 14, 2, 64, 16384, 4096, dtype, seed=2)
    args = {"scaling": 0.125, "band_width": 64, "want_key_mass": True}
    eager = td.decode_attention_triton(*inputs, **args)

    graph, captured = _captured(lambda: td.decode_attention_triton(*inputs, **args))  # warm-up outside it
    graph.replay()
    torch.cuda.synchronize()
    for name in ("out", "lse", "key_mass", "band"):
        assert torch.equal(getattr(captured, name), getattr(eager, name)), name

    fresh = _inputs(1, 14, 2, 64, 16384, 4096, dtype, seed=3)
    for buffer, value in zip(inputs, fresh):
        buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    expected = td.decode_attention_triton(*fresh, **args)
    for name in ("out", "lse", "key_mass", "band"):
        assert torch.equal(getattr(captured, name), getattr(expected, name)), name


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[6], CASES[7]], ids=lambda c: c[0])
def test_one_launch_form_on_cuda(case, monkeypatch) -> None:
    """``FUSED_FINISH`` compiled: the finishing work done by the last split program of each KV head (an atomic
    arrival count) gives the two-launch result, also when repeated many times (an ordering bug between the
    partials' stores and the count would show as a flaky difference), and inside a replayed CUDA graph; the
    counters are back at 0 after every call. Bit-equality is expected (the same helpers in the same order); the
    tolerance only covers a compiler choosing another reduction layout in the fused kernel."""
    td = _module()
    _, batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, band_width, softcap = case
    inputs = _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, torch.bfloat16, seed=4)
    args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": True, "softcap": softcap}
    two = td.decode_attention_triton(*inputs, **args)
    monkeypatch.setattr(td, "FUSED_FINISH", True)

    def same(got) -> None:
        for name in ("out", "lse", "key_mass") + (("band",) if band_width else ()):
            torch.testing.assert_close(getattr(got, name), getattr(two, name), atol=1e-6, rtol=1e-6)
        assert not td._COUNTERS[inputs[0].device].any()

    for _ in range(20):
        same(td.decode_attention_triton(*inputs, **args))
    graph, captured = _captured(lambda: td.decode_attention_triton(*inputs, **args))
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        same(captured)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[6], CASES[7]], ids=lambda c: c[0])
def test_dependent_launch_finish_on_cuda(case, monkeypatch) -> None:
    """``PDL_FINISH`` compiled (Hopper and later): the finishing pass started as a programmatic dependent launch
    gives the plain launch's result bit for bit. Two inputs alternate, so a finishing program that read the split
    pass's partials before they were written would read the other input's values (the allocator hands the same
    scratch back) and differ; also inside a replayed CUDA graph, with the inputs refilled between replays."""
    td = _module()
    from ltri_rag.kernels._triton_support import dependent_launch

    if not dependent_launch(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("no programmatic dependent launch here (compute capability < 9.0 or an older triton)")
    _, batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, band_width, softcap = case
    pair = [_inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, torch.bfloat16, seed=s)
            for s in (5, 6)]
    args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": True, "softcap": softcap}
    plain = [td.decode_attention_triton(*inputs, **args) for inputs in pair]
    monkeypatch.setattr(td, "PDL_FINISH", True)
    names = ("out", "lse", "key_mass") + (("band",) if band_width else ())

    def same(got, want) -> None:
        for name in names:
            assert torch.equal(getattr(got, name), getattr(want, name)), name

    for i in range(20):
        same(td.decode_attention_triton(*pair[i % 2], **args), plain[i % 2])
    buffers = [t.clone() for t in pair[0]]
    graph, captured = _captured(lambda: td.decode_attention_triton(*buffers, **args))
    for i in range(6):
        for buffer, value in zip(buffers, pair[i % 2]):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        same(captured, plain[i % 2])
