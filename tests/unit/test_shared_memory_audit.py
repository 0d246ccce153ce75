"""``benchmarks/shared_memory_audit.py``: a kernel variant compiled ahead of time for another GPU (no such GPU
needed) reports its shared memory at the asked pipeline depth against that GPU's limit and, when it does not fit,
the deepest depth that does; the kernels launched through ``launch_fitting`` are found in the kernel sources; the
script refuses to run without CUDA."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from benchmarks import shared_memory_audit as audit  # noqa: E402


def _matmul(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A pipelined loop of 16-bit tiles: each stage holds one A and one B tile in shared memory."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rk[:, None] * BLOCK_N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc += tl.dot(tl.load(a_ptrs), tl.load(b_ptrs))
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * BLOCK_N
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc.to(tl.float16))


def _source():
    from triton.compiler import ASTSource

    kernel = JITFunction(_matmul)  # compiled, whatever TRITON_INTERPRET says
    signature = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "i32", "BLOCK_M": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}  # as a launch with aligned tensors specialises
    return ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
                     attrs=aligned)


@pytest.mark.skipif(not hasattr(triton, "compile"), reason="no ahead-of-time compiler in this triton")
def test_a_deep_pipeline_is_lowered_until_it_fits_sm86() -> None:
    """32 KiB of tiles per stage: six stages pass sm_86's 99 KiB, the reported depth fits and one deeper does not;
    the same variant fits sm_90 as asked. The options a launch on another GPU carried (its arch) are dropped."""
    src = _source()
    options = {"num_warps": 4, "num_stages": 6, "arch": "sm90"}
    try:
        on_86 = audit.audit_variant(triton.compile, src, options, 86)
    except FileNotFoundError as exc:  # pragma: no cover - a triton wheel without its CUDA tools
        pytest.skip(f"no CUDA compiler tools here: {exc}")
    assert on_86["error"] is None, on_86["error"]
    assert on_86["asked_stages"] == 6 and on_86["shared"] > audit.LIMITS[86] and on_86["fits"] is False
    depth = on_86["fitting_stages"]
    assert depth is not None and 1 <= depth < 6
    from triton.backends.compiler import GPUTarget

    def shared(stages: int, capability: int = 86) -> int:
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": 4, "num_stages": stages})
        return int(compiled.metadata.shared)

    assert shared(depth) <= audit.LIMITS[86] < shared(depth + 1)
    on_90 = audit.audit_variant(triton.compile, src, options, 90)
    assert on_90["fits"] is True and on_90["fitting_stages"] == 6 and on_90["shared"] <= audit.LIMITS[90]


def test_target_options_and_the_wrapped_kernels() -> None:
    assert audit.target_options({"arch": "sm90", "num_stages": 3, "supported_fp8_dtypes": ("fp8e5",),
                                 "num_warps": 8}) == {"num_stages": 3, "num_warps": 8}
    wrapped = audit.fitting_kernels()
    assert {"_decode_split_kernel", "_local_fwd_kernel", "_local_key_mass_kernel", "_span_stats_kernel",
            "_span_mass_kernel", "_span_decode_scores_kernel"} <= wrapped
    assert "_decode_finish_kernel" not in wrapped


def test_a_variant_that_does_not_compile_is_reported() -> None:
    def failing(*_a, **_k):
        raise RuntimeError("ptxas failed")

    row = audit.audit_variant(failing, object(), {"num_stages": 2}, 86)
    assert row["error"] == "RuntimeError: ptxas failed" and row["fits"] is None and row["shared"] is None


def test_bad_arguments_and_no_cuda(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                   tmp_path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # main sets it; restored after the test
    with pytest.raises(SystemExit) as exc:
        audit.main(["--prompt", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--prompt must be >= 1 and --decode >= 0, got 0, 6" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            audit.main(["--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()
