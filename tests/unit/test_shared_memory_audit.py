"""``benchmarks/shared_memory_audit.py``: a kernel variant compiled ahead of time for another GPU (no such GPU
needed) reports its shared memory at the asked pipeline depth against that GPU's limit and, when it does not fit,
the deepest depth that does; every span-selection sort variant is built from its argument types and audited without
a GPU; the kernels launched through ``launch_fitting`` are found in the kernel sources; the full audit refuses to
run without CUDA.

The compiles run in a child process without ``TRITON_INTERPRET``: a process that imported triton under the
interpreter (as this one may have, for the kernel tests) has interpreted standard-library functions and cannot
compile at all."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from benchmarks import shared_memory_audit as audit  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


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


def matmul_source():
    """``_matmul`` as a launch with aligned 16-bit tensors would specialise it (compiled, not interpreted)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    signature = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "i32", "BLOCK_M": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    return ASTSource(fn=JITFunction(_matmul), signature=signature,
                     constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, attrs=aligned)


def _in_clean_process(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a child Python at the repository root, without ``TRITON_INTERPRET``, with its own Triton
    cache; fails the test with the child's output when it fails, skips where the CUDA compiler tools are missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if "FileNotFoundError" in done.stderr and "ptxas" in done.stderr:  # pragma: no cover - a wheel without tools
        pytest.skip("no CUDA compiler tools in this triton")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_deep_pipeline_is_lowered_until_it_fits_sm86(tmp_path: Path) -> None:
    """32 KiB of tiles per stage: six stages pass sm_86's 99 KiB, the reported depth fits and one deeper does not;
    the same variant fits sm_90 as asked. The options a launch on another GPU carried (its arch) are dropped."""
    _in_clean_process("""
        import triton
        from triton.backends.compiler import GPUTarget
        from benchmarks import shared_memory_audit as audit
        from tests.unit.test_shared_memory_audit import matmul_source

        src = matmul_source()
        on_86 = audit.audit_variant(triton.compile, src, {"num_warps": 4, "num_stages": 6, "arch": "sm90"}, 86)
        assert on_86["error"] is None, on_86["error"]
        assert on_86["asked_stages"] == 6 and on_86["shared"] > audit.LIMITS[86] and on_86["fits"] is False, on_86
        depth = on_86["fitting_stages"]
        assert depth is not None and 1 <= depth < 6, on_86

        def shared(stages):
            options = {"num_warps": 4, "num_stages": stages}
            return int(triton.compile(src, target=GPUTarget("cuda", 86, 32), options=options).metadata.shared)

        assert shared(depth) <= audit.LIMITS[86] < shared(depth + 1), (depth, shared(depth), shared(depth + 1))
        on_90 = audit.audit_variant(triton.compile, src, {"num_warps": 4, "num_stages": 6}, 90)
        assert on_90["fits"] is True and on_90["fitting_stages"] == 6 and on_90["shared"] <= audit.LIMITS[90], on_90
        """, tmp_path)


def test_target_options_and_the_wrapped_kernels() -> None:
    assert audit.target_options({"arch": "sm90", "num_stages": 3, "supported_fp8_dtypes": ("fp8e5",),
                                 "num_warps": 8}) == {"num_stages": 3, "num_warps": 8}
    wrapped = audit.fitting_kernels()
    assert {"_decode_split_kernel", "_local_fwd_kernel", "_local_key_mass_kernel", "_span_stats_kernel",
            "_span_mass_kernel", "_span_decode_scores_kernel"} <= wrapped
    assert "_decode_finish_kernel" not in wrapped
    # found through the package, not next to the script (a device run copies benchmarks/ elsewhere)
    assert audit.kernel_dir() == Path(importlib.util.find_spec("ltri_rag.kernels").origin).resolve().parent
    with pytest.raises(RuntimeError, match="no launch_fitting"):
        audit.fitting_kernels(Path(audit.__file__).parent)  # benchmarks/: no kernel module there


def test_a_variant_that_does_not_compile_is_reported() -> None:
    def failing(*_a, **_k):
        raise RuntimeError("ptxas failed")

    row = audit.audit_variant(failing, object(), {"num_stages": 2}, 86)
    assert row["error"] == "RuntimeError: ptxas failed" and row["fits"] is None and row["shared"] is None


def test_bad_arguments_and_no_cuda(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # main sets it; restored after the test
    with pytest.raises(SystemExit) as exc:
        audit.main(["--prompt", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--prompt must be >= 1 and --decode >= 0, got 0, 6" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            audit.main(["--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()


def test_every_sort_variant_is_built_without_a_gpu() -> None:
    """The span-selection sorts come in ten variants (``launch_variants``), each built here from its argument types
    with its settings by name (from a compiled copy of the module where this process imported it interpreted)."""
    from triton.runtime.jit import JITFunction

    from ltri_rag.kernels import triton_sort_fill

    built = audit.sort_variant_sources(tail=64)
    assert len(built) == len(triton_sort_fill.launch_variants()) == 10
    for (kernel, src, options), (name, meta) in zip(built, triton_sort_fill.launch_variants()):
        assert kernel == f"_{name}_kernel" and options == {"num_warps": meta["num_warps"], "num_stages": 3}
        assert isinstance(src.fn, JITFunction)
        settings = audit._settings(src)
        for key, value in meta.items():
            assert key == "num_warps" or f"{key}={value}" in settings, (settings, meta)
        assert (name == "sort_fill") == ("TAIL=64" in settings)


def test_sort_variants_alone_run_without_a_gpu(tmp_path: Path) -> None:
    """``--sort-variants``: no request, no GPU; the report names each variant, its settings and whether it launches
    at sm_86 (the smallest variant only, to keep the test short)."""
    out = tmp_path / "out"
    _in_clean_process(f"""
        from benchmarks import shared_memory_audit as audit

        smallest = audit.sort_variant_sources()[-1:]
        audit.sort_variant_sources = lambda tail=64: smallest
        audit.main(["--sort-variants", "--out", {str(out)!r}])
        """, tmp_path)
    result = json.loads((out / "bench.json").read_text())
    assert result["meta"]["target"] == "sm_86" and result["meta"]["models"] == []
    (row,) = result["variants"]
    assert row["kernel"] == "_sort_fill_kernel" and "BLOCK=128" in row["settings"]
    assert row["error"] is None and row["fits"] is True and 0 < row["shared"] <= audit.LIMITS[86]
    assert row["launches"] is True and row["shared_here"] is None and row["launch_fitting"] is False
    report = (out / "bench.md").read_text()
    assert "--sort-variants" in report
    assert "| `_sort_fill_kernel` | BLOCK=128,TAIL=64,FLOAT=True | 4 | 3 | - |" in report


def test_out_of_time_the_report_still_comes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Past ``--max-seconds`` no further variant is compiled; the report is written and counts the rest as not
    audited (nothing is called failing for want of time); a limit that is not positive is refused."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # main sets it; restored after the test
    with pytest.raises(SystemExit) as exc:
        audit.main(["--sort-variants", "--max-seconds", "0", "--out", str(tmp_path / "refused")])
    assert exc.value.code == 2 and not (tmp_path / "refused").exists()
    audit.main(["--sort-variants", "--max-seconds", "1e-9", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert result["variants"] == [] and result["meta"]["not_audited"] == 10
    report = (tmp_path / "out" / "bench.md").read_text()
    assert "0 variants audited, 0 that would not launch there; 10 not audited (--max-seconds 1e-09)." in report
