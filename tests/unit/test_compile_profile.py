"""``benchmarks/compile_profile.py`` checks its arguments and refuses to run without CUDA (what it measures, Triton
compiles, happens on a GPU only); its settings summary names a source object's constexprs."""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks import compile_profile


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # main sets it; restored after the test
    with pytest.raises(SystemExit) as exc:
        compile_profile.main(["--layers", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "--layers and --prompt must be >= 1 and --decode >= 0, got 0, 12288, 6" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        compile_profile.main(["--cache-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_settings_summary() -> None:
    src = types.SimpleNamespace(constants={(3,): 128, "FLOAT": True, (4,): object(), (5, 1): 2})
    assert compile_profile._settings(src) == "3=128,FLOAT=True,5/1=2"
    assert compile_profile._settings(types.SimpleNamespace()) == ""
