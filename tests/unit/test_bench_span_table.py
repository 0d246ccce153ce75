"""The span-table append benchmark runs end to end on tiny sizes and restores the growth setting."""

import json

import pytest

from benchmarks.bench_span_table import main
from ltri_rag import growing


def test_small_run_times_both_forms(tmp_path) -> None:
    before = growing.GROWTH
    main(["--appends", "6", "--spans", "3", "--vectors", "2", "--heads", "2", "--dim", "8", "--repeats", "1",
          "--device", "cpu", "--out", str(tmp_path)])
    assert growing.GROWTH == before
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["form"] for r in result["rows"]] == [f"in place, growth {before}", "concatenated (growth None)"]
    assert all(r["seconds"] > 0 and len(r["all_seconds"]) == 1 for r in result["rows"])
    assert result["meta"]["device"] == "cpu" and result["meta"]["appends"] == 6
    assert "| concatenated (growth None) |" in (tmp_path / "bench.md").read_text()


def test_bad_sizes_are_named(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--appends", "0", "--out", str(tmp_path)])
    assert "--appends must be >= 1, got 0" in capsys.readouterr().err
