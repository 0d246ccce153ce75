"""``benchmarks.bench_cpu_memory_part`` at small sizes: both settings timed in turn, the flag restored, the report
written, bad arguments refused."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_cpu_memory_part as bench
from ltri_rag.kernels import attention


def test_the_benchmark_times_both_paths_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "WINDOW", 40)
    monkeypatch.setattr(bench, "CHUNK", 24)
    monkeypatch.setattr(bench, "MEMORY", 30)
    monkeypatch.setattr(bench, "BAND", 4)
    seen = []
    real = attention._attention_flash_cpu

    def spy(*args, **kwargs):
        seen.append(attention.CPU_FLASH_MEMORY)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_attention_flash_cpu", spy)
    monkeypatch.setattr(attention, "CPU_FLASH_MEMORY", True)
    bench.main(["--out", str(tmp_path), "--reps", "1"])
    assert attention.CPU_FLASH_MEMORY is True  # restored
    assert seen and all(seen)  # the fused op ran, and only while the flag was on
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["kind"], r["shape"]) for r in rows] == [("chunk", "qwen2.5-0.5b"), ("chunk", "llama3-8b"),
                                                       ("decode step", "qwen2.5-0.5b"), ("decode step", "llama3-8b")]
    for r in rows:
        assert len(r["times"]["fused"]) == len(r["times"]["scores"]) == 1
        assert max(r["max_abs_diff"].values()) < 1e-4  # the two paths agree
    assert "| chunk (24 queries) | qwen2.5-0.5b (14 / 2 / 64) |" in (tmp_path / "bench.md").read_text()


def test_the_prefill_row_is_rendered():
    row = {"kind": "prefill", "model": "m.gguf", "tokens": 16384, "fused_s": 110.2, "scores_s": 117.5,
           "times": {"fused": [106.0, 114.4], "scores": [122.8, 112.2]}, "max_abs_logit_diff": 1.6e-5,
           "same_argmax": True}
    text = bench.render([row], {"command": "c", "cpus": 2, "machine": "x", "torch": "t"})
    assert "runs in s (fused 106.0 / 114.4; scores 122.8 / 112.2)" in text and "(1.07x)" in text


@pytest.mark.parametrize("args", [["--reps", "0"], ["--rounds", "0"], ["--length", "-1"]])
def test_bad_arguments_are_refused(tmp_path, args, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), *args])
    assert "must be >= 1" in capsys.readouterr().err
