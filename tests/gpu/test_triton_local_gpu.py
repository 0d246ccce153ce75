"""On CUDA: the compiled Triton ``local_attention`` against the torch reference at model-like sizes.

float32 inputs (IEEE products, no TF32) must match to 1e-4; bfloat16 / float16 inputs are compared with the float32
reference on the same rounded values (the kernel rounds ``p`` to the input dtype for ``p @ v``, as flash attention
does). The 16-bit tolerances are first estimates, to be confirmed on the GPU. Skipped without a GPU.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (batch, num_heads, num_kv_heads, q_len, causal_offset, head_dim, band_width, want_key_mass, extra_lse, softcap)
CASES = [
    (1, 14, 2, 300, 1700, 64, 64, True, True, None),  # Qwen2.5-0.5B-like heads, chunk after a window
    (2, 28, 4, 257, 1000, 128, 64, True, True, 50.0),  # Qwen2.5-7B-like heads, softcap, batch 2
    (1, 8, 8, 512, 0, 128, 64, True, False, None),  # MHA, first chunk (offset 0)
    (1, 12, 2, 1, 4000, 128, 64, True, True, None),  # decode step
    (1, 4, 1, 97, 33, 256, 16, True, True, None),  # head_dim 256, G=4
]

TOLERANCES = {  # dtype: (out / lse atol, key_mass rtol, band atol)
    torch.float32: (1e-4, 1e-4, 1e-5),
    torch.float16: (3e-3, 1e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3, 1e-4),
}


def _kernel():
    pytest.importorskip("triton")
    from ltri_rag.kernels import triton_local

    if triton_local.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")
    return triton_local.local_attention_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}off{}D{}w{}m{}x{}cap{}".format(*c))
def test_matches_reference_on_cuda(case, dtype) -> None:
    from ltri_rag.kernels.attention import local_attention

    local_attention_triton = _kernel()
    batch, num_heads, num_kv_heads, q_len, offset, head_dim, band_width, want_mass, extra, softcap = case
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_len = offset + q_len
    q = torch.randn(batch, num_heads, q_len, head_dim, device="cuda", generator=gen).to(dtype)
    k = torch.randn(batch, num_kv_heads, kv_len, head_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(batch, num_kv_heads, kv_len, head_dim, device="cuda", generator=gen).to(dtype)
    extra_lse = torch.randn(batch, num_heads, q_len, device="cuda", generator=gen) * 2 + 6 if extra else None
    args = {"scaling": head_dim ** -0.5, "causal_offset": offset, "extra_lse": extra_lse, "band_width": band_width,
            "want_key_mass": want_mass, "softcap": softcap}
    got = local_attention_triton(q, k, v, **args)
    ref = local_attention(q.float(), k.float(), v.float(), **args)
    atol, mass_rtol, band_atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.out, ref.out, atol=atol, rtol=0)
    torch.testing.assert_close(got.lse, ref.lse, atol=atol, rtol=0)
    torch.testing.assert_close(got.key_mass, ref.key_mass, rtol=mass_rtol, atol=1e-6)
    torch.testing.assert_close(got.band, ref.band, atol=band_atol, rtol=0)


# (batch, num_heads, num_kv_heads, q_len, causal_offset, mem_len, head_dim, band_width, own memory queries)
MEMORY_CASES = [
    (1, 14, 2, 512, 4096, 2176, 64, 64, False),  # Qwen2.5-0.5B-like: a prefill chunk, window, sinks + budget
    (1, 32, 8, 2048, 4096, 2176, 128, 64, False),  # Llama-3-8B-like, a 2,048-token chunk
    (2, 12, 4, 77, 300, 1000, 128, 16, True),  # batch 2, memory queries of their own (fixed scheme)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: "B{}H{}kv{}q{}off{}M{}D{}w{}own{}".format(*c))
def test_memory_part_fused_on_cuda(case, dtype) -> None:
    """Memory part, local part and their merge in one kernel, against the reference's separate passes."""
    from ltri_rag.kernels.attention import local_attention

    local_attention_triton = _kernel()
    batch, num_heads, num_kv_heads, q_len, offset, mem_len, head_dim, band_width, own = case
    gen = torch.Generator(device="cuda").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    q, k, v = (rand(batch, num_heads, q_len, head_dim), rand(batch, num_kv_heads, offset + q_len, head_dim),
               rand(batch, num_kv_heads, offset + q_len, head_dim))
    q_mem = rand(batch, num_heads, q_len, head_dim) if own else q
    mem_k, mem_v = rand(batch, num_kv_heads, mem_len, head_dim), rand(batch, num_kv_heads, mem_len, head_dim)
    mask = torch.rand(batch, num_kv_heads, mem_len, device="cuda", generator=gen) > 0.2
    args = {"scaling": head_dim ** -0.5, "causal_offset": offset, "band_width": band_width, "want_key_mass": True}
    got = local_attention_triton(q, k, v, memory=(q_mem, mem_k, mem_v, mask), **args)
    ref = local_attention(q.float(), k.float(), v.float(),
                          memory=(q_mem.float(), mem_k.float(), mem_v.float(), mask), **args)
    atol, mass_rtol, band_atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.out, ref.out, atol=atol, rtol=0)
    torch.testing.assert_close(got.lse, ref.lse, atol=atol, rtol=0)
    torch.testing.assert_close(got.key_mass, ref.key_mass, rtol=mass_rtol, atol=1e-6)
    torch.testing.assert_close(got.band, ref.band, atol=band_atol, rtol=0)
