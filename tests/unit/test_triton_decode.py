"""The fused Triton decode attention equals the engine's torch composition (float32, random inputs).

Reference: ``attention_with_lse`` over the memory, ``local_attention`` over the window with the memory's LSE as
``extra_lse``, ``merge_attention`` of the two (``decode_attention``). Without CUDA the kernels run on CPU tensors
under the Triton interpreter: ``TRITON_INTERPRET`` is set here, at import, before triton (and the kernel module,
whose kernels Triton builds at import) is loaded. With CUDA the same cases run compiled on the GPU. Skipped where
triton does not import.
"""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module, record_launch_flag

triton_decode = kernel_module("triton_decode")

from ltri_rag.kernels import decode_shapes
from ltri_rag.kernels.attention import attention_with_lse, local_attention, merge_attention


decode_attention = triton_decode.decode_attention
decode_attention_triton = triton_decode.decode_attention_triton


def _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, *, dtype=torch.float32, seed=0):
    """Random ``(q, mem_k, mem_v, mem_mask, win_k, win_v)``; ``mem_len`` None = no memory; ``mask``: None (all
    valid), "random" (about 30 % padding, and KV head 0 of the last sequence all padding) or "none_valid"."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, 1, head_dim, generator=gen) * 1.5
    win_k = torch.randn(batch, num_kv_heads, win_len, head_dim, generator=gen)
    win_v = torch.randn(batch, num_kv_heads, win_len, head_dim, generator=gen)
    mem_k = mem_v = mem_mask = None
    if mem_len is not None:
        mem_k = torch.randn(batch, num_kv_heads, mem_len, head_dim, generator=gen)
        mem_v = torch.randn(batch, num_kv_heads, mem_len, head_dim, generator=gen)
        if mask == "random":
            mem_mask = torch.rand(batch, num_kv_heads, mem_len, generator=gen) > 0.3
            mem_mask[-1, 0] = False
        elif mask == "none_valid":
            mem_mask = torch.zeros(batch, num_kv_heads, mem_len, dtype=torch.bool)
    q, win_k, win_v, mem_k, mem_v = (None if t is None else t.to(dtype).to(DEVICE)
                                     for t in (q, win_k, win_v, mem_k, mem_v))
    return q, mem_k, mem_v, None if mem_mask is None else mem_mask.to(DEVICE), win_k, win_v


def _composition(q, mem_k, mem_v, mem_mask, win_k, win_v, *, scaling, band_width=0, want_key_mass=False,
                 softcap=None, q_mem=None):
    """The engine's decode step today, spelled out (independently of ``decode_attention``)."""
    out_m = lse_m = None
    if mem_k is not None:
        out_m, lse_m = attention_with_lse(q if q_mem is None else q_mem, mem_k, mem_v, scaling=scaling,
                                          key_mask=mem_mask, softcap=softcap)
    local = local_attention(q, win_k, win_v, scaling=scaling, causal_offset=win_k.shape[2] - 1, extra_lse=lse_m,
                            band_width=band_width, want_key_mass=want_key_mass, softcap=softcap)
    if out_m is None:
        return local.out, local.lse, local.key_mass, local.band
    out, lse = merge_attention(out_m, lse_m, local.out, local.lse)
    return out, lse, local.key_mass, local.band


def _assert_matches(got, ref, *, atol=1e-5, mass_rtol=1e-4):
    out, lse, key_mass, band = ref
    assert got.out.dtype == got.lse.dtype == torch.float32
    assert got.out.shape == out.shape and got.lse.shape == lse.shape
    torch.testing.assert_close(got.out, out, atol=atol, rtol=0)
    torch.testing.assert_close(got.lse, lse, atol=atol, rtol=0)
    assert (got.key_mass is None) == (key_mass is None)
    if key_mass is not None:
        torch.testing.assert_close(got.key_mass, key_mass, rtol=mass_rtol, atol=1e-7)
    assert (got.band is None) == (band is None)
    if band is not None:
        torch.testing.assert_close(got.band, band, rtol=mass_rtol, atol=1e-7)


# (batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, band_width, want_key_mass, softcap)
CASES = [
    (1, 4, 4, 32, None, 1, None, 3, True, None),  # no memory, W=1 (the new token alone), G=1
    (2, 8, 4, 64, 45, 37, "random", 8, True, None),  # G=2, batch 2, a KV head with no valid memory key
    (1, 14, 2, 64, 70, 33, "random", 16, True, None),  # Qwen-like G=7
    (2, 4, 1, 128, 50, 20, None, 5, True, 30.0),  # G=4, D=128, softcap, mask None
    (1, 2, 1, 256, 33, 17, "random", 0, True, -20.0),  # D=256, negative softcap (|softcap| used), no band
    (1, 4, 2, 80, 40, 9, "random", 12, True, None),  # D=80 (padded to 128), band wider than the window
    (2, 6, 2, 32, 0, 1, None, 4, True, None),  # memory present with M=0, W=1
    (1, 6, 3, 32, 30, 25, "none_valid", 6, True, None),  # every memory key padding
    (2, 7, 1, 32, 64, 32, "random", 0, False, None),  # out / lse only, lengths multiples of the tile
    (1, 8, 4, 16, 21, 5, "random", 5, False, 10.0),  # D=16, band only, softcap
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}D{}M{}W{}{}w{}m{}cap{}".format(*c))
def test_matches_the_torch_composition(case) -> None:
    batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, band_width, want_mass, softcap = case
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len,
                                                      mask)
    args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": want_mass, "softcap": softcap}
    got = decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    ref = _composition(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    _assert_matches(got, ref)
    _assert_matches(decode_attention(q, mem_k, mem_v, mem_mask, win_k, win_v, **args), ref)  # the torch reference


def test_splits_agree() -> None:
    """1, 2, an odd count, one split per tile and more splits than tiles (capped) give the same result; so do
    16-key tiles (splits starting and ending inside the memory, in the window, and across the two)."""
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(2, 6, 2, 32, 75, 41, "random", seed=1)
    args = {"scaling": 0.2, "band_width": 7, "want_key_mass": True}
    ref = _composition(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    results = [decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, num_splits=s, block_n=16, **args)
               for s in (1, 2, 3, 5, 8, 100)]
    results.append(decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args))  # default split
    for got in results:
        _assert_matches(got, ref)
    for got in results[1:]:
        torch.testing.assert_close(got.out, results[0].out, atol=2e-6, rtol=0)
        torch.testing.assert_close(got.key_mass, results[0].key_mass, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("form", ["one_tile", "one_tile_small_slices", "previous"])
def test_finishing_pass_forms_agree(form, monkeypatch) -> None:
    """The finishing pass's forms (``ONE_TILE_FINISH``: the merge spread over column slices and the band read in one
    tile; slices of 16 columns with a few splits per load; the previous form, block 0 merging every column and the
    band walking the KV heads) match the torch composition over awkward shapes, with and without key mass."""
    if form == "previous":
        monkeypatch.setattr(triton_decode, "ONE_TILE_FINISH", False)
    elif form == "one_tile_small_slices":  # [G, chunk, 16] tiles of at most 64 values: several slices and loads
        monkeypatch.setattr(triton_decode, "MERGE_ELEMENTS", 64)
        monkeypatch.setattr(triton_decode, "BAND_TILE_ELEMENTS", 16)  # the band falls back to the walk
    for case in (CASES[1], CASES[2], CASES[3], CASES[8]):
        batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, band_width, want_mass, softcap = case
        q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len,
                                                          win_len, mask, seed=3)
        args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": want_mass,
                "softcap": softcap}
        ref = _composition(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
        for splits in (None, 5):
            _assert_matches(decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, num_splits=splits,
                                                    block_n=16, **args), ref)


@pytest.mark.parametrize("form", ["one_tile", "band_walk", "previous"])
def test_one_launch_form_equals_two_launches(form, monkeypatch) -> None:
    """``FUSED_FINISH``: the split pass's last program per KV head (and per sequence, for the band) does the
    finishing work in the same order as the finishing launch: the same out / lse / key mass / band bit for bit, in
    every finishing form, with the window length on the device too; the arrival counters are back at 0 after every
    call (what a replayed graph relies on); no finishing launch is made."""
    if form == "previous":
        monkeypatch.setattr(triton_decode, "ONE_TILE_FINISH", False)
    elif form == "band_walk":  # small merge slices, several loads; the band walks the KV heads
        monkeypatch.setattr(triton_decode, "MERGE_ELEMENTS", 64)
        monkeypatch.setattr(triton_decode, "BAND_TILE_ELEMENTS", 16)
    finish_kernel = triton_decode._decode_finish_kernel
    for case in (CASES[0], CASES[1], CASES[2], CASES[3], CASES[6], CASES[7], CASES[8]):
        batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, band_width, want_mass, softcap = case
        call = _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, seed=5)
        args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": want_mass,
                "softcap": softcap}
        ref = _composition(*call, **args)
        length = torch.tensor([max(1, win_len - 3)], device=call[0].device)
        for splits, win in ((None, None), (1, None), (4, length)):
            monkeypatch.setattr(triton_decode, "FUSED_FINISH", False)
            monkeypatch.setattr(triton_decode, "_decode_finish_kernel", finish_kernel)
            two = decode_attention_triton(*call, num_splits=splits, win_len=win, block_n=16, **args)
            monkeypatch.setattr(triton_decode, "FUSED_FINISH", True)
            monkeypatch.setattr(triton_decode, "_decode_finish_kernel", None)  # a finishing launch would fail
            one = decode_attention_triton(*call, num_splits=splits, win_len=win, block_n=16, **args)
            for name in ("out", "lse", "key_mass", "band"):
                expected, got = getattr(two, name), getattr(one, name)
                assert (expected is None) == (got is None), name
                assert expected is None or torch.equal(expected, got), (case, splits, name)
            assert not triton_decode._COUNTERS[call[0].device].any()
            if win is None:
                _assert_matches(one, ref)


def test_dependent_launch_form_changes_nothing(monkeypatch) -> None:
    """``PDL_FINISH``: the finishing pass as a programmatic dependent launch (compiled, compute capability >= 9)
    gives the plain launch's out / lse / key mass / band bit for bit, with the window length on the device too.
    Under the interpreter or on an older GPU the switch falls back to the plain launch (no ``launch_pdl`` option is
    passed, which the interpreter's launcher would not take)."""
    from ltri_rag.kernels._triton_support import dependent_launch

    pdl_here = not triton_decode.INTERPRETED and dependent_launch(torch.device(DEVICE))
    waits = record_launch_flag(monkeypatch, triton_decode, ("_decode_finish_kernel",), "GDC_WAIT")
    dependent = record_launch_flag(monkeypatch, triton_decode, ("_decode_finish_kernel",), "launch_pdl")
    for case in (CASES[1], CASES[2], CASES[7]):
        batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, band_width, want_mass, softcap = case
        call = _inputs(batch, num_heads, num_kv_heads, head_dim, mem_len, win_len, mask, seed=6)
        args = {"scaling": head_dim ** -0.5, "band_width": band_width, "want_key_mass": want_mass,
                "softcap": softcap}
        length = torch.tensor([max(1, win_len - 2)], device=call[0].device)
        for win in (None, length):
            monkeypatch.setattr(triton_decode, "PDL_FINISH", False)
            plain = decode_attention_triton(*call, win_len=win, block_n=16, **args)
            monkeypatch.setattr(triton_decode, "PDL_FINISH", True)
            launched = decode_attention_triton(*call, win_len=win, block_n=16, **args)
            for name in ("out", "lse", "key_mass", "band"):
                expected, got = getattr(plain, name), getattr(launched, name)
                assert (expected is None) == (got is None), name
                assert expected is None or torch.equal(expected, got), (case, name)
            assert (waits[-2], dependent[-2]) == (False, None)
            assert (waits[-1], dependent[-1]) == ((True, True) if pdl_here else (False, None))


def test_dependent_launch_needs_hopper_and_a_compiled_kernel(monkeypatch) -> None:
    """``dependent_launch``: never for a CPU tensor or under the interpreter; on CUDA only from compute capability
    9.0 and with a triton that has both halves of the mechanism."""
    from ltri_rag.kernels import _triton_support as support

    assert not support.dependent_launch(torch.device("cpu"))
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(support, "interpreted", lambda: False)
    monkeypatch.setattr(support, "_triton_has_dependent_launch", lambda: True)
    for capability, expected in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(support, "_compute_capability", lambda index, c=capability: c)
        assert support.dependent_launch(cuda0) is expected, capability
    monkeypatch.setattr(support, "_triton_has_dependent_launch", lambda: False)
    assert not support.dependent_launch(cuda0)
    monkeypatch.setattr(support, "_triton_has_dependent_launch", lambda: True)
    monkeypatch.setattr(support, "interpreted", lambda: True)
    assert not support.dependent_launch(cuda0)


def test_launch_settings_change_nothing_but_speed() -> None:
    """Explicit ``num_warps`` / ``num_stages`` (the tuning knobs of bench_decode_attention's ``--grid``) give the
    default's result; bad values are named."""
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(1, 8, 2, 64, 50, 30, "random", seed=2)
    args = {"scaling": 0.125, "band_width": 5, "want_key_mass": True}
    ref = decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    for warps, stages in ((1, 1), (2, 2), (8, 4)):
        got = decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, num_warps=warps, num_stages=stages,
                                      **args)
        torch.testing.assert_close(got.out, ref.out, atol=2e-6, rtol=0)
        torch.testing.assert_close(got.key_mass, ref.key_mass, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="num_warps must be a power of two >= 1, got 3"):
        decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, num_warps=3, **args)
    with pytest.raises(ValueError, match="num_stages must be >= 1, got 0"):
        decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, num_stages=0, **args)


@pytest.mark.parametrize("length", [1, 5, 16, 17, 40])
def test_window_length_read_from_device_memory(length: int) -> None:
    """With ``win_len`` (a device tensor) the window is the first ``length`` keys of a 40-key buffer: the result
    equals the call on that slice (key mass 0 past it), whatever garbage the rest of the buffer holds; the split
    count and tiling come from the capacity (tiles past the length are skipped)."""
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(2, 8, 2, 32, 37, 40, "random", seed=3)
    args = {"scaling": 0.17, "band_width": 6, "want_key_mass": True}
    ref = decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k[:, :, :length], win_v[:, :, :length],
                                  block_n=16, **args)
    junk_k, junk_v = win_k.clone(), win_v.clone()
    junk_k[:, :, length:] = 1e4  # what lies past the length must not count
    junk_v[:, :, length:] = float("nan")
    for dtype in (torch.int32, torch.int64):
        got = decode_attention_triton(q, mem_k, mem_v, mem_mask, junk_k, junk_v, block_n=16,
                                      win_len=torch.tensor([length], dtype=dtype, device=q.device), **args)
        torch.testing.assert_close(got.out, ref.out, atol=2e-6, rtol=0)
        torch.testing.assert_close(got.lse, ref.lse, atol=2e-6, rtol=0)
        torch.testing.assert_close(got.band, ref.band, atol=1e-6, rtol=1e-5)
        assert got.key_mass.shape == (2, 2, 40)
        torch.testing.assert_close(got.key_mass[:, :, :length], ref.key_mass, rtol=1e-5, atol=1e-8)
        assert not got.key_mass[:, :, length:].any()


def test_window_length_without_memory_and_bad_lengths() -> None:
    q, _, _, _, win_k, win_v = _inputs(1, 4, 4, 16, None, 20, None, seed=4)
    args = {"scaling": 0.25, "band_width": 3, "want_key_mass": True}
    ref = decode_attention_triton(q, None, None, None, win_k[:, :, :9], win_v[:, :, :9], **args)
    got = decode_attention_triton(q, None, None, None, win_k, win_v, win_len=torch.tensor([9], device=q.device),
                                  **args)
    torch.testing.assert_close(got.out, ref.out, atol=2e-6, rtol=0)
    torch.testing.assert_close(got.key_mass[:, :, :9], ref.key_mass, rtol=1e-5, atol=1e-8)
    for bad in (torch.tensor([1, 2]), torch.tensor([2.0]), 3):
        with pytest.raises(ValueError, match="win_len must be a one-element int32 / int64 tensor"):
            decode_attention_triton(q, None, None, None, win_k, win_v, win_len=bad, **args)


def test_num_splits_from_shapes_only(monkeypatch) -> None:
    """About two programs per multiprocessor, >= 2 tiles per split, <= 256 splits, no empty split."""
    monkeypatch.setattr(decode_shapes, "_multiprocessors", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert triton_decode.num_splits_for(2112, 8, cuda) == 33  # Llama-3-8B, 128K + 4K keys, 64-key tiles
    assert triton_decode.num_splits_for(160, 2, cuda) == 80  # Qwen-0.5B, 16K + 4K keys, 128-key tiles
    assert triton_decode.num_splits_for(3, 1, cuda) == 1
    assert triton_decode.num_splits_for(100_000, 1, cuda) == 256
    assert triton_decode.num_splits_for(10, 1, cuda, value=4) == 4  # 3 tiles per split, none empty
    assert triton_decode.num_splits_for(10, 1, cuda, value=6) == 5  # 2 tiles per split: 5 splits
    assert triton_decode.num_splits_for(10, 4, torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="num_splits must be >= 1, got 0"):
        triton_decode.num_splits_for(10, 4, cuda, value=0)


def test_pipeline_stages_fit_shared_memory() -> None:
    """An explicit large ``block_n`` lowers the pipeline depth instead of failing to launch: on the H200,
    ``block_n=128`` in float32 at head_dim 128 asked for 272 KiB of shared memory with the default three stages."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert decode_shapes.stages_that_fit(3, 128, 128, 4, cuda) == 1  # 128 KiB per stage
    assert decode_shapes.stages_that_fit(3, 64, 128, 4, cuda) == 3  # 64 KiB per stage: the default fits
    assert decode_shapes.stages_that_fit(3, 128, 256, 2, cuda) == 1
    assert decode_shapes.stages_that_fit(3, 256, 256, 4, cuda) == 1  # never below one
    assert decode_shapes.stages_that_fit(3, 128, 128, 4, cpu) == 3  # the interpreter has no such limit
    for head_dim in (64, 80, 128, 256):  # the defaults never lose a stage
        for dtype in (torch.bfloat16, torch.float32):
            block_n, _, _, stages = triton_decode.block_sizes(head_dim, cuda, dtype)
            block_d = max(16, 1 << (head_dim - 1).bit_length())
            assert decode_shapes.stages_that_fit(stages, block_n, block_d, dtype.itemsize, cuda) == stages


def test_separate_memory_queries() -> None:
    """``q_mem`` (the memory part's queries under another position scheme) is used for the memory keys only."""
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(1, 8, 2, 32, 40, 19, "random", seed=2)
    q_mem = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    args = {"scaling": 0.18, "band_width": 4, "want_key_mass": True, "q_mem": q_mem}
    ref = _composition(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    _assert_matches(decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args), ref)
    _assert_matches(decode_attention(q, mem_k, mem_v, mem_mask, win_k, win_v, **args), ref)


def test_strided_views() -> None:
    """Inputs as transposes of ``[B, L, H, D]`` buffers and a mask slice are read through their strides."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 32, generator=gen).to(DEVICE).transpose(1, 2)
    mem_k, mem_v, win_k, win_v = (torch.randn(2, n, 2, 32, generator=gen).to(DEVICE).transpose(1, 2)
                                  for n in (29, 29, 13, 13))
    mem_mask = (torch.rand(2, 2, 58, generator=gen) > 0.2).to(DEVICE)[:, :, ::2]
    args = {"scaling": 0.25, "band_width": 4, "want_key_mass": True}
    _assert_matches(decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args),
                    _composition(q, mem_k, mem_v, mem_mask, win_k, win_v, **args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs(dtype) -> None:
    """16-bit inputs (``p`` rounded to the input dtype for ``p @ v``; bfloat16 computed in float32 under the
    interpreter) stay close to the float32 composition on the same values; statistics use float32 scores."""
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(1, 4, 2, 32, 50, 21, "random", dtype=dtype, seed=4)
    args = {"scaling": 32 ** -0.5, "band_width": 4, "want_key_mass": True}
    got = decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, **args)
    ref = _composition(*(None if t is None or t.dtype == torch.bool else t.float()
                         for t in (q, mem_k, mem_v)), mem_mask, win_k.float(), win_v.float(), **args)
    atol = 1e-5 if dtype == torch.bfloat16 and DEVICE == "cpu" else (3e-3 if dtype == torch.float16 else 2e-2)
    _assert_matches(got, ref, atol=atol, mass_rtol=1e-3)


def test_mixed_dtypes_run_in_float32() -> None:
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(1, 4, 2, 32, 30, 11, "random", seed=5)
    args = {"scaling": 0.2, "band_width": 2, "want_key_mass": True}
    half_mem = (mem_k.half(), mem_v.half())
    got = decode_attention_triton(q, *half_mem, mem_mask, win_k, win_v, **args)
    _assert_matches(got, _composition(q, half_mem[0].float(), half_mem[1].float(), mem_mask, win_k, win_v, **args))


def test_exported() -> None:
    from ltri_rag.kernels import decode_attention as exported_ref
    from ltri_rag.kernels import decode_attention_triton as exported

    assert exported.__name__ == "decode_attention_triton" and exported_ref.__name__ == "decode_attention"


def test_bad_inputs_raise() -> None:
    q, mem_k, mem_v, mem_mask, win_k, win_v = _inputs(1, 4, 2, 32, 10, 5, "random")
    fn = decode_attention_triton
    with pytest.raises(ValueError, match="q_len must be 1 .*got q_len 3"):
        fn(q.expand(-1, -1, 3, -1), mem_k, mem_v, mem_mask, win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match="W >= 1"):
        fn(q, mem_k, mem_v, mem_mask, win_k[:, :, :0], win_v[:, :, :0], scaling=1.0)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        fn(q, mem_k, mem_v, mem_mask, win_k, win_v[:, :, :4], scaling=1.0)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        fn(q, mem_k, mem_v[:, :, :9], mem_mask, win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match=r"mem_mask must be \[batch, num_kv_heads, M\]=\(1, 2, 10\), got \(1, 2, 9\)"):
        fn(q, mem_k, mem_v, mem_mask[:, :, :9], win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match="mem_mask must be a bool tensor"):
        fn(q, mem_k, mem_v, mem_mask.float(), win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match=r"num_kv_heads of the memory \(1\) and the window \(2\) differ"):
        fn(q, mem_k[:, :1], mem_v[:, :1], None, win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match="num_heads 3 is not a multiple of num_kv_heads 2"):
        fn(q[:, :3], mem_k, mem_v, mem_mask, win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match="both be given or both be None"):
        fn(q, mem_k, None, None, win_k, win_v, scaling=1.0)
    with pytest.raises(ValueError, match="q_mem must match q"):
        fn(q, mem_k, mem_v, mem_mask, win_k, win_v, scaling=1.0, q_mem=q[:, :2])
    with pytest.raises(ValueError, match="band_width must be >= 0, got -1"):
        fn(q, mem_k, mem_v, mem_mask, win_k, win_v, scaling=1.0, band_width=-1)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 24"):
        fn(q, mem_k, mem_v, mem_mask, win_k, win_v, scaling=1.0, block_n=24)
    with pytest.raises(ValueError, match="num_splits must be >= 1, got 0"):
        fn(q, mem_k, mem_v, mem_mask, win_k, win_v, scaling=1.0, num_splits=0)
    with pytest.raises(ValueError, match="head_dim 512 > 256"):
        big = torch.zeros(1, 1, 1, 512, device=DEVICE)
        fn(big, None, None, None, big, big, scaling=1.0)


@pytest.mark.parametrize("mode", ["ltri", "infllm"])
def test_engine_decode_steps_through_the_fused_kernel(mode, monkeypatch) -> None:
    """With ``attention_backend="triton"`` a decoded token goes through the fused kernel (memory, window and merge
    in one launch pair), with the same logits as the torch composition, for the contiguous (ltri) and fixed
    (InfLLM: rotated memory queries) position schemes."""
    from ltri_rag import LtriConfig, LtriSession
    from tests.unit.tiny_models import random_ids, tiny_model

    calls = []
    kernel = triton_decode.decode_attention_triton

    def spy(q, mem_k, *args, **kwargs):
        calls.append(0 if mem_k is None else mem_k.shape[2])
        return kernel(q, mem_k, *args, **kwargs)

    monkeypatch.setattr(triton_decode, "decode_attention_triton", spy)
    model = tiny_model("llama", num_heads=4, num_kv_heads=2).to(DEVICE)
    # eager decode steps (on CUDA the default replays captured graphs, which call no Python: see the graph test)
    common = {"mode": mode, "num_sink_tokens": 3, "local_window": 16, "chunk_size": 8, "budget": 24, "page_size": 5,
              "decode_graph": False}
    sessions = [LtriSession(model, LtriConfig(**common, attention_backend=b)) for b in ("torch", "triton")]
    ids = random_ids(1, 56).to(DEVICE)
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    calls.clear()  # prefill may end on a one-token chunk; count decode steps only
    for _ in range(3):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert len(calls) == 3 * model.config.num_hidden_layers and max(calls) > 0


def test_engine_graph_form_decode_through_the_fused_kernel() -> None:
    """Graph-form decode steps (``ltri_rag.decode_graph``: the window a buffer of fixed capacity with its length on
    the device, the memory part in fixed-width buffers) through the fused kernel give the eager Triton session's
    logits; on CUDA the steps are captured and replayed as a CUDA graph, here (interpreter) they run eagerly."""
    from ltri_rag import LtriConfig, LtriSession
    from ltri_rag.decode_graph import DecodeGraph
    from tests.unit.tiny_models import random_ids, tiny_model

    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3).to(DEVICE)
    cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                     evict_stride=6, span_max_len=8, decode_retrieval_stride=4, attention_backend="triton")
    eager = LtriSession(model, cfg.replace(decode_graph=False))
    graphed = LtriSession(model, cfg)
    if graphed.decode_graph is None:  # no CUDA: graph form without capture
        graphed.decode_graph = DecodeGraph(model, graphed.cache, graphed.cache_kwarg, capture=False)
    ids = random_ids(1, 30, seed=12).to(DEVICE)
    logits = [s.feed(ids) for s in (eager, graphed)]
    for _ in range(10):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in (eager, graphed)]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert graphed.decode_graph.steps >= 5


def test_engine_decode_in_one_launch_changes_nothing(monkeypatch) -> None:
    """A session decoding with ``FUSED_FINISH`` (the decode attention in one launch) produces the two-launch
    session's logits bit for bit, prompt and decoded tokens through a decode-time eviction."""
    from ltri_rag import LtriConfig, LtriSession
    from tests.unit.tiny_models import random_ids, tiny_model

    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=5).to(DEVICE)
    cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                     evict_stride=4, span_max_len=8, attention_backend="triton", decode_graph=False)
    ids = random_ids(1, 30, seed=13).to(DEVICE)
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(triton_decode, "FUSED_FINISH", fused)
        session = LtriSession(model, cfg)
        logits = [session.feed(ids)]
        for _ in range(6):
            logits.append(session.step(logits[-1].argmax(-1)))
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])
    assert not triton_decode._COUNTERS[ids.device].any()
