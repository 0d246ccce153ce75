"""The Triton ``local_attention`` equals the torch reference (float32, random inputs).

Without CUDA the kernels run on CPU tensors under the Triton interpreter: ``TRITON_INTERPRET`` is set here, at
import, before triton (and the kernel module, whose kernels Triton builds at import) is loaded. With CUDA the same
cases run compiled on the GPU. Skipped where triton does not import.
"""

import math

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_local = kernel_module("triton_local")

from ltri_rag.kernels.attention import local_attention


local_attention_triton = triton_local.local_attention_triton


def _inputs(batch, num_heads, num_kv_heads, q_len, causal_offset, head_dim, extra, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_len = causal_offset + q_len
    q = torch.randn(batch, num_heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, num_kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, num_kv_heads, kv_len, head_dim, generator=gen)
    extra_lse = torch.randn(batch, num_heads, q_len, generator=gen) * 2 + 2 if extra else None
    q, k, v = (t.to(dtype).to(DEVICE) for t in (q, k, v))
    return q, k, v, None if extra_lse is None else extra_lse.to(DEVICE)


def _assert_matches(got, ref, *, atol=1e-4, mass_rtol=1e-4):
    assert got.out.dtype == got.lse.dtype == torch.float32
    torch.testing.assert_close(got.out, ref.out, atol=atol, rtol=0)
    torch.testing.assert_close(got.lse, ref.lse, atol=atol, rtol=0)  # equal -inf count as close
    assert (got.key_mass is None) == (ref.key_mass is None)
    if ref.key_mass is not None:
        torch.testing.assert_close(got.key_mass, ref.key_mass, rtol=mass_rtol, atol=1e-7)
    assert (got.band is None) == (ref.band is None)
    if ref.band is not None:
        torch.testing.assert_close(got.band, ref.band, atol=atol, rtol=0)


# (batch, num_heads, num_kv_heads, q_len, causal_offset, head_dim, band_width, want_key_mass, extra_lse, softcap)
CASES = [
    (1, 2, 2, 5, 0, 32, 0, False, False, None),  # MHA, tiny, offset 0, out/lse only
    (2, 4, 2, 37, 21, 32, 8, True, True, None),  # G=2, batch 2, lengths not multiples of the blocks
    (1, 14, 2, 19, 45, 64, 16, True, True, None),  # Qwen-like G=7, D=64
    (2, 7, 1, 33, 0, 32, 5, True, False, 30.0),  # G=7, offset 0, softcap, no extra_lse
    (1, 1, 1, 40, 70, 128, 0, True, True, 20.0),  # D=128, softcap, key mass without band
    (1, 4, 2, 1, 50, 64, 4, True, True, None),  # decode: a single query
    (1, 2, 1, 50, 10, 32, 40, True, True, None),  # band wider than a key block
    (2, 2, 2, 64, 64, 32, 4, True, True, None),  # lengths exact multiples of the blocks
    (1, 3, 1, 9, -3, 48, 6, True, True, None),  # head_dim 48 (padded); negative offset: rows without keys
    (1, 2, 2, 24, 8, 16, 3, False, True, -15.0),  # D=16, negative softcap (|softcap| used), band only
    (1, 6, 2, 12, 12, 32, 30, True, False, None),  # band wider than the whole key range
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}off{}D{}w{}m{}x{}cap{}".format(*c))
def test_matches_reference(case) -> None:
    batch, num_heads, num_kv_heads, q_len, offset, head_dim, band_width, want_mass, extra, softcap = case
    q, k, v, extra_lse = _inputs(batch, num_heads, num_kv_heads, q_len, offset, head_dim, extra)
    args = {"scaling": head_dim ** -0.5, "causal_offset": offset, "extra_lse": extra_lse, "band_width": band_width,
                "want_key_mass": want_mass, "softcap": softcap}
    _assert_matches(local_attention_triton(q, k, v, **args), local_attention(q, k, v, **args))


def _memory(batch, num_heads, num_kv_heads, q_len, mem_len, head_dim, q, *, seed, own_queries=False, holes=True,
            dtype=torch.float32):
    """``(q_mem, mem_k, mem_v, mem_mask)`` with per-KV-head padding (False) at random places."""
    gen = torch.Generator().manual_seed(seed)
    mem_k = torch.randn(batch, num_kv_heads, mem_len, head_dim, generator=gen) * 1.5
    mem_v = torch.randn(batch, num_kv_heads, mem_len, head_dim, generator=gen)
    mask = torch.rand(batch, num_kv_heads, mem_len, generator=gen) > (0.3 if holes else -1.0)
    q_mem = torch.randn(batch, num_heads, q_len, head_dim, generator=gen).to(dtype).to(DEVICE) if own_queries else q
    return q_mem, mem_k.to(dtype).to(DEVICE), mem_v.to(dtype).to(DEVICE), mask.to(DEVICE)


# (batch, num_heads, num_kv_heads, q_len, causal_offset, mem_len, head_dim, band_width, own memory queries, softcap)
MEMORY_CASES = [
    (1, 4, 2, 13, 9, 21, 32, 6, False, None),  # memory not a multiple of the key block, holes per head
    (2, 14, 2, 19, 30, 40, 64, 16, True, None),  # Qwen-like G=7, batch 2, memory queries of their own (fixed)
    (1, 2, 1, 1, 40, 33, 32, 4, False, 25.0),  # a single query (decode-sized), softcap
    (1, 3, 1, 9, 0, 5, 48, 3, False, None),  # head_dim 48 (padded), first chunk: no window
    (1, 2, 2, 7, 6, 0, 32, 2, False, None),  # an empty memory
]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: "B{}H{}kv{}q{}off{}M{}D{}w{}own{}cap{}".format(*c))
def test_memory_part_fused_matches_reference(case) -> None:
    """With ``memory`` the kernel attends memory and local keys in one online softmax: out / lse over both, key
    mass and band normalised by that total, as the reference's separate passes and merge."""
    batch, num_heads, num_kv_heads, q_len, offset, mem_len, head_dim, band_width, own, softcap = case
    q, k, v, _ = _inputs(batch, num_heads, num_kv_heads, q_len, offset, head_dim, False, seed=7)
    memory = _memory(batch, num_heads, num_kv_heads, q_len, mem_len, head_dim, q, seed=8, own_queries=own)
    args = {"scaling": head_dim ** -0.5, "causal_offset": offset, "band_width": band_width, "want_key_mass": True,
            "softcap": softcap, "memory": memory}
    got, ref = local_attention_triton(q, k, v, **args), local_attention(q, k, v, **args)
    _assert_matches(got, ref)
    if mem_len:  # the memory really counts: without it the result differs
        plain = local_attention(q, k, v, **{**args, "memory": None})
        assert (plain.out - ref.out).abs().max() > 1e-2 and bool((ref.lse > plain.lse).all())


def test_memory_rows_fully_masked_and_bad_memory_raise() -> None:
    q, k, v, _ = _inputs(1, 4, 2, 6, 5, 32, False, seed=9)
    q_mem, mem_k, mem_v, mask = _memory(1, 4, 2, 6, 17, 32, q, seed=10)
    mask[:, 1] = False  # KV head 1 has no real memory key: its rows are local attention alone
    args = {"scaling": 0.2, "causal_offset": 5, "band_width": 3, "want_key_mass": True}
    got = local_attention_triton(q, k, v, memory=(q_mem, mem_k, mem_v, mask), **args)
    _assert_matches(got, local_attention(q, k, v, memory=(q_mem, mem_k, mem_v, mask), **args))
    alone = local_attention(q, k, v, **args)
    torch.testing.assert_close(got.out[:, 2:], alone.out[:, 2:], atol=1e-5, rtol=0)
    for fn in (local_attention, local_attention_triton):
        with pytest.raises(ValueError, match="either memory or extra_lse"):
            fn(q, k, v, memory=(q_mem, mem_k, mem_v, mask), extra_lse=alone.lse, **args)
        with pytest.raises(ValueError, match="mem_mask must be a bool"):
            fn(q, k, v, memory=(q_mem, mem_k, mem_v, mask.float()), **args)
        with pytest.raises(ValueError, match="KV heads"):
            fn(q, k, v, memory=(q_mem, mem_k[:, :1], mem_v[:, :1], mask[:, :1]), **args)


def test_small_blocks_split_groups() -> None:
    """block_m=16 with G=7: row blocks start and end inside a query's group of heads."""
    q, k, v, extra_lse = _inputs(1, 7, 1, 11, 9, 32, True, seed=1)
    args = {"scaling": 0.2, "causal_offset": 9, "extra_lse": extra_lse, "band_width": 6, "want_key_mass": True}
    got = local_attention_triton(q, k, v, block_m=16, block_n=16, **args)
    _assert_matches(got, local_attention(q, k, v, **args))


@pytest.mark.parametrize("launch", [(16, 16, 1, 1), (32, 64, 2, 2), (64, 16, 4, 3)])
def test_key_mass_launch_of_its_own(monkeypatch, launch) -> None:
    """``KEY_MASS_LAUNCH`` gives the key-mass kernel tiles other than the forward's (its own grid over the keys):
    the same key mass, G=7 rows split across blocks, row blocks on and off the causal diagonal."""
    q, k, v, extra_lse = _inputs(1, 7, 1, 29, 37, 32, True, seed=3)
    args = {"scaling": 0.2, "causal_offset": 37, "extra_lse": extra_lse, "band_width": 6, "want_key_mass": True}
    ref = local_attention(q, k, v, **args)
    monkeypatch.setattr(triton_local, "KEY_MASS_LAUNCH", launch)
    _assert_matches(local_attention_triton(q, k, v, **args), ref)
    monkeypatch.setattr(triton_local, "KEY_MASS_LAUNCH", (24, 16, 1, 1))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        local_attention_triton(q, k, v, **args)


def test_extreme_extra_lse() -> None:
    """Rows whose memory part is empty (-inf) or dominates (lse + 30) keep their probabilities right."""
    q, k, v, _ = _inputs(1, 4, 2, 21, 14, 32, False, seed=2)
    plain = local_attention(q, k, v, scaling=0.18, causal_offset=14)
    extra_lse = plain.lse.clone()
    extra_lse[:, :, ::3] = -math.inf
    extra_lse[:, :, 1::3] += 30.0
    args = {"scaling": 0.18, "causal_offset": 14, "extra_lse": extra_lse, "band_width": 7, "want_key_mass": True}
    _assert_matches(local_attention_triton(q, k, v, **args), local_attention(q, k, v, **args))


def test_strided_views() -> None:
    """q, k, v as transposes of ``[B, L, H, D]`` buffers (not contiguous) are read through their strides."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 13, 4, 32, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 20, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 20, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
    args = {"scaling": 0.25, "causal_offset": 7, "band_width": 4, "want_key_mass": True}
    _assert_matches(local_attention_triton(q, k, v, **args), local_attention(q, k, v, **args))


def test_float16_inputs() -> None:
    """16-bit inputs (p rounded to float16 for p @ v) stay close to the float32 reference on the same values."""
    q, k, v, extra_lse = _inputs(1, 4, 2, 20, 13, 32, True, dtype=torch.float16, seed=4)
    args = {"scaling": 32 ** -0.5, "causal_offset": 13, "extra_lse": extra_lse, "band_width": 4, "want_key_mass": True}
    got = local_attention_triton(q, k, v, **args)
    _assert_matches(got, local_attention(q.float(), k.float(), v.float(), **args), atol=2e-3, mass_rtol=1e-3)


def test_exported_and_empty() -> None:
    from ltri_rag.kernels import local_attention_triton as exported

    assert exported.__name__ == "local_attention_triton"
    q, k, v, _ = _inputs(1, 2, 1, 0, 5, 32, False)
    got = local_attention_triton(q, k, v, scaling=1.0, causal_offset=5, band_width=3, want_key_mass=True)
    assert got.out.shape == (1, 2, 0, 32) and got.lse.shape == (1, 2, 0) and got.band.shape == (1, 0, 3)
    assert torch.equal(got.key_mass, torch.zeros(1, 1, 5, device=DEVICE))


def test_bad_inputs_raise() -> None:
    q, k, v, _ = _inputs(1, 4, 2, 5, 4, 32, False)
    with pytest.raises(ValueError, match=r"causal_offset 3 \+ q_len 5 must equal kv_len 9"):
        local_attention_triton(q, k, v, scaling=1.0, causal_offset=3)
    with pytest.raises(ValueError, match=r"extra_lse must be \[batch, num_heads, q_len\]"):
        local_attention_triton(q, k, v, scaling=1.0, causal_offset=4, extra_lse=torch.zeros(1, 2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="band_width must be >= 0"):
        local_attention_triton(q, k, v, scaling=1.0, causal_offset=4, band_width=-1)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        local_attention_triton(q, k, v, scaling=1.0, causal_offset=4, block_m=24)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        local_attention_triton(q[:, :3], k, v, scaling=1.0, causal_offset=4)
    with pytest.raises(ValueError, match="head_dim 512"):
        big = torch.zeros(1, 1, 2, 512, device=DEVICE)
        local_attention_triton(big, big, big, scaling=1.0, causal_offset=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_engine_with_the_triton_backend_matches_the_torch_backend(family) -> None:
    """``attention_backend="triton"`` changes the kernels, not the result: same logits through prefill and decode,
    with retrieval, span segmentation (band) and index vectors (key mass) all driven by the Triton pass."""
    from ltri_rag import LtriConfig, LtriSession
    from ltri_rag.kernels.attention import local_attention_backend
    from tests.unit.tiny_models import random_ids, tiny_model

    assert local_attention_backend("triton", torch.device(DEVICE)) is triton_local.local_attention_triton
    assert local_attention_backend("auto", torch.device("cpu")) is local_attention
    from ltri_rag.kernels import attention

    for capability, triton_expected in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        with pytest.MonkeyPatch.context() as patch:  # no GPU needed: the rule reads the device's capability
            patch.setattr(attention, "_capability", lambda index, c=capability: c)
            chosen = local_attention_backend("auto", torch.device("cuda", 0))
            assert (chosen is triton_local.local_attention_triton) is triton_expected, capability
            assert (chosen is local_attention) is not triton_expected
            assert local_attention_backend("triton", torch.device("cuda", 0)) is triton_local.local_attention_triton
    with pytest.raises(ValueError, match="nope"):
        local_attention_backend("nope", torch.device("cpu"))
    with pytest.raises(ValueError, match="attention_backend"):
        LtriConfig(attention_backend="nope")  # type: ignore[arg-type]
    model = tiny_model(family, sliding_window=8 if family == "gemma3" else None).to(DEVICE)
    common = dict(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=24, page_size=5,
                  evict_stride=4, span_min_len=2, span_max_len=12)
    sessions = [LtriSession(model, LtriConfig(**common, attention_backend=b)) for b in ("torch", "triton")]
    ids = random_ids(1, 70).to(DEVICE)
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert sessions[1].cache.memory_tokens() == sessions[0].cache.memory_tokens() > 0
    for _ in range(3):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
