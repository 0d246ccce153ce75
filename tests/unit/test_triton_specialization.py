"""The Triton kernels are compiled once per model shape, not once per sequence length.

Triton specialises every integer argument of a jit function on its value being 1 or a multiple of 16 and compiles
a new binary for each combination it meets. Lengths change at every decoded token and every chunk (memory keys,
window keys, span and query counts), so a length argument left specialised makes a fresh process compile new
binaries for seconds at a time while the engine reads (on the H200 an ltri prefill chunk took 3 s of host time for
0.1 s of GPU work, a decode step 1.5 s for 9 ms). Each kernel is launched here twice with different lengths (under
the interpreter on CPU, compiled with CUDA); every integer argument whose value changed must be excluded from
specialisation. Strides are exempt: they change only with the lengths of contiguous tensors whose inner
dimension makes them keep their divisibility, and they carry the alignment facts the compiler vectorises with.
Compile-time sizes (``tl.constexpr``) may follow the lengths only in powers of two.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from tests.unit import test_triton_decode as decode_tests
from tests.unit import test_triton_local as local_tests
from tests.unit import test_triton_scoring as scoring_tests


def _excluded(kernel) -> set[str]:
    """Names of the kernel's arguments excluded from specialisation (compiled or interpreted jit function)."""
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:  # the interpreter keeps the decorator's arguments
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    arg_names = list(kernel.arg_names)
    return {arg_names[n] if isinstance(n, int) else n for n in names}


def _record(monkeypatch, kernels) -> dict[str, list[dict[str, int]]]:
    """Capture the integer arguments of every launch of ``kernels`` (by kernel name)."""
    seen: dict[str, list[dict[str, int]]] = {}
    for kernel in kernels:
        original = kernel.run

        def run(*args, _kernel=kernel, _original=original, **kwargs):
            bound = dict(zip(_kernel.arg_names, args))  # kernel[grid](...) calls run(*args, grid=, warmup=)
            bound.update({k: v for k, v in kwargs.items() if k in _kernel.arg_names})
            ints = {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}
            seen.setdefault(_kernel.fn.__name__, []).append(ints)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return seen


def _constexprs(kernel) -> set[str]:
    params = inspect.signature(kernel.fn).parameters.values()
    return {p.name for p in params if "constexpr" in str(p.annotation)}


def _check(seen, kernels) -> None:
    assert {k.fn.__name__ for k in kernels} <= set(seen), f"not every kernel launched: {sorted(seen)}"
    for kernel in kernels:
        calls = seen[kernel.fn.__name__]
        varying = {name for name in calls[0] if len({call.get(name) for call in calls}) > 1}
        constexprs = _constexprs(kernel) & varying
        # a compile-time size may follow the lengths in powers of two (a handful of binaries in all), no finer
        for name in constexprs:
            values = [call[name] for call in calls]
            assert all(v > 0 and v & (v - 1) == 0 for v in values), f"{kernel.fn.__name__}: {name} = {values}"
        lengths = {name for name in varying - constexprs if not name.startswith("stride_")}
        assert lengths, f"{kernel.fn.__name__}: the launches should differ in some length"
        missing = lengths - _excluded(kernel)
        assert not missing, f"{kernel.fn.__name__} specialises on length arguments {sorted(missing)}"


@pytest.mark.parametrize("fused", [False, True], ids=["two_launches", "one_launch"])
def test_decode_kernels_do_not_specialise_on_lengths(fused, monkeypatch) -> None:
    td = decode_tests.triton_decode
    monkeypatch.setattr(td, "FUSED_FINISH", fused)
    kernels = [td._decode_split_kernel] + ([] if fused else [td._decode_finish_kernel])
    seen = _record(monkeypatch, kernels)
    for mem_len, win_len in ((37, 20), (64, 33)):
        q, mem_k, mem_v, mem_mask, win_k, win_v = decode_tests._inputs(1, 4, 2, 16, mem_len, win_len, "random")
        td.decode_attention_triton(q, mem_k, mem_v, mem_mask, win_k, win_v, scaling=0.25, band_width=4,
                                   want_key_mass=True)
    _check(seen, kernels)
    if not fused:  # the split pass is not compiled again for finishing shapes it does not use
        assert {call["SPLITS_P"] for call in seen["_decode_split_kernel"]} == {1}


def test_local_kernels_do_not_specialise_on_lengths(monkeypatch) -> None:
    tl_mod = local_tests.triton_local
    kernels = [tl_mod._local_fwd_kernel, tl_mod._local_key_mass_kernel]
    seen = _record(monkeypatch, kernels)
    for q_len, offset in ((5, 11), (16, 32)):
        q, k, v, _ = local_tests._inputs(1, 4, 2, q_len, offset, 16, False)
        tl_mod.local_attention_triton(q, k, v, scaling=0.25, causal_offset=offset, band_width=4, want_key_mass=True)
    _check(seen, kernels)


def test_scoring_kernels_do_not_specialise_on_lengths(monkeypatch) -> None:
    ts = scoring_tests.triton_scoring
    kernels = [ts._span_stats_kernel, ts._span_mass_kernel, ts._span_mass_stored_kernel]
    seen = _record(monkeypatch, kernels)
    for q_len, num_spans, width in ((3, 7, 2), (16, 33, 4)):
        counts = scoring_tests._counts(num_spans, width)
        queries, vectors, owner = scoring_tests._inputs(4, 2, q_len, 16, counts)
        for score_buffer in (None, 0):  # scores stored (the default) or recomputed
            ts.span_probabilities_triton(queries, vectors, owner, num_spans, 0.25, score_buffer=score_buffer)
    _check(seen, kernels)


def test_one_query_scoring_kernel_does_not_specialise_on_lengths(monkeypatch) -> None:
    ts = scoring_tests.triton_scoring
    kernels = [ts._span_decode_scores_kernel]
    seen = _record(monkeypatch, kernels)
    for num_spans, width in ((7, 2), (33, 5)):
        counts = scoring_tests._counts(num_spans, width)
        queries, vectors, owner = scoring_tests._inputs(4, 2, 1, 16, counts)
        ts.span_probabilities_triton(queries, vectors, owner, num_spans, 0.25)
    _check(seen, kernels)


def test_selection_kernels_do_not_specialise_on_lengths(monkeypatch) -> None:
    from tests.unit import test_triton_select as select_tests

    tsel = select_tests.triton_select
    kernels = [tsel._fill_ranked_kernel, tsel._rank_partials_kernel, tsel._rank_keys_kernel]
    seen = _record(monkeypatch, kernels)
    for num_spans, budget in ((7, 5), (48, 33)):
        scores, prior, recency = select_tests._rank_inputs(4, num_spans, False, seed=num_spans)
        keys = tsel.rank_keys(scores, 1, prior=prior, prior_weight=0.5, recency=recency, bonus=1.0, block=16)
        lengths = torch.randint(1, 5, (num_spans,))
        select_tests._fill(keys, lengths, budget, 16)
    _check(seen, kernels)


def test_row_kernels_do_not_specialise_on_lengths(monkeypatch) -> None:
    from tests.unit import test_triton_gather as gather_tests
    from tests.unit import test_triton_rope as rope_tests

    tg, tr = gather_tests.triton_gather, rope_tests.triton_rope
    kernels = [tg._gather_two_tiers_kernel, tg._scatter_rows_kernel, tr._gather_rotate_kernel]
    seen = _record(monkeypatch, kernels)
    device = gather_tests.DEVICE
    for n, fast_rows in ((5, 7), (32, 16)):
        (fk, fv), (sk, sv), gen = gather_tests._tiers(fast_rows, 40, 16, torch.float32, seed=n)
        rows = torch.randperm(fast_rows + 40, generator=gen)[:n]
        tg.gather_two_tiers(fk, fv, sk, sv, rows.to(device), fast_rows)
        dst = torch.zeros(64, 16, device=device)
        src = torch.randn(n, 16, generator=gen).to(device)
        tg.scatter_rows(dst, dst.clone(), torch.randperm(64, generator=gen)[:n].to(device), src, src)
        main = torch.randn(50, 16, device=device)
        source = (torch.randperm(50, generator=gen)[:n] * 16).to(device)
        delta = torch.arange(n, device=device) - 3
        tr.gather_rotate_triton(main, main, source, delta, rope_tests._inv_freq(8).to(device))
    _check(seen, kernels)


@pytest.mark.parametrize("half_tiles", [True, False], ids=["half_tiles", "full_tile"])
def test_assembly_kernel_does_not_specialise_on_lengths(half_tiles, monkeypatch) -> None:
    from tests.unit import test_triton_assemble as assemble_tests

    ta = assemble_tests.triton_assemble
    monkeypatch.setattr(ta, "HALF_TILES", half_tiles)
    kernels = [ta._assemble_halves_kernel if half_tiles else ta._assemble_kernel]
    seen = _record(monkeypatch, kernels)
    for width, sinks, split in ((5, 2, 3), (16, 3, 6)):
        args, _ = assemble_tests._case(2, width, sinks, 16, 8, split, torch.float32, seed=width)
        args["base"] += width
        ta.assemble_memory(**args, scheme="contiguous")
    _check(seen, kernels)
