"""The quality report: intervals, tables and plots from JSONL rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.report import bootstrap_ci, fmt_cell, load_rows, main, render_markdown


def _rows() -> list[dict]:
    rows = []
    for system, hit in (("full", 1.0), ("ltri", 0.5), ("streaming", 0.0)):
        for length in (4096, 8192):
            for i in range(4):
                rows.append({"model": "m", "system": system, "task": "niah_single", "length": length,
                             "depth": [0.05, 0.35, 0.65, 0.95][i], "seed": i,
                             "score": hit if system != "ltri" else float(i % 2), "prefill_s": 1.0})
    return rows


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible() -> None:
    scores = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    lo, hi = bootstrap_ci(scores)
    assert 0.0 <= lo < 0.7 < hi <= 1.0
    assert bootstrap_ci(scores) == (lo, hi)
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_cells_show_mean_interval_and_count() -> None:
    assert fmt_cell([1.0, 1.0]) == "100 [100, 100] (2)"
    assert fmt_cell([]) == "-"
    assert fmt_cell([0.0, 1.0]).startswith("50 [") and fmt_cell([0.0, 1.0]).endswith("(2)")


def test_markdown_has_every_system_and_length() -> None:
    text = render_markdown(_rows())
    header = next(line for line in text.splitlines() if line.startswith("| length |"))
    assert header.split("|")[2:5] == [" full ", " streaming ", " ltri "]  # the report's fixed order
    assert "| 4096 | 100 [100, 100] (4) | 0 [0, 0] (4) | 50 [" in text
    assert "### m / niah_single" in text


def test_all_task_means_over_another_task_mix_are_marked() -> None:
    rows = _rows() + [{"model": "m", "system": s, "task": "vt", "length": 4096, "depth": 0.5, "seed": 0,
                       "score": 0.0, "prefill_s": 1.0} for s in ("full", "ltri")]
    text = render_markdown(rows)
    row = next(line for line in text.splitlines() if line.startswith("| 4096 |"))
    assert row.split("|")[3].strip().endswith("*")  # streaming: niah_single only, the others also vt
    assert not row.split("|")[2].strip().endswith("*") and "streaming at length 4096 lacks vt" in text
    assert "| 8192 | 100 [100, 100] (4) | 0 [0, 0] (4) | 50 [" in text  # a complete length: no mark


def test_cli_writes_report_and_plots(tmp_path: Path) -> None:
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()) + "\n{truncated", "utf-8")
    assert len(load_rows([tmp_path])) == 24  # the torn last line is skipped
    if not os.environ.get("CI"):
        pytest.importorskip("matplotlib")
    main([str(tmp_path)])
    assert (tmp_path / "report.md").read_text().startswith("# Long-context quality")
    assert (tmp_path / "accuracy_vs_length_m.png").stat().st_size > 1000
    assert (tmp_path / "depth_heatmap_m_niah_single.png").stat().st_size > 1000


def test_misses_are_classed_by_what_the_model_said() -> None:
    from benchmarks.misses import classify, tabulate

    context = ("... One of the special magic numbers for blue-fox is: 1234567. ... "
               "One of the special magic numbers for red-owl is: 7654321. ... in 1999 ...")
    assert classify(" 7654321.", ["1234567"], context) == "distractor"
    assert classify(" 5555555.", ["1234567"], context) == "invented"
    assert classify(" the number is unknown", ["1234567"], context) == "no number"
    assert classify(" 1234567 and 9999999", ["1234567", "7654321"], context) == "partial"
    assert classify(": 1234.  It's a number", ["1234567"], context) == "cut short"
    assert classify(" 12.", ["1234567"], context) == "cut short"
    assert classify(" 1.", ["1234567"], context) == "invented"  # one digit is not evidence of the needle
    assert classify(" 10.  This is the number", ["1234567"], context) == "invented"
    from collections import Counter
    table = tabulate({("niah_multikey", "ltri", 32768): Counter({"distractor": 2})})
    assert "| niah_multikey | ltri | 32768 | 2 | 2 | 0 | 0 | 0 | 0 |" in table


def test_coverage_counts_complete_cells_missing_rows_and_their_cost() -> None:
    from benchmarks.report import coverage

    def row(system: str, task: str, length: int, seed: int) -> dict:
        return {"model": "m", "system": system, "task": task, "length": length, "seed": seed, "score": 1.0,
                "prefill_s": 30.0, "decode_s": 6.0}

    rows = [row("full", t, n, i) for t in ("a", "b") for n in (1, 2) for i in range(3)]  # every cell complete
    rows += [row("ltri", "a", 1, i) for i in range(3)] + [row("ltri", "b", 2, 0)]  # 1 complete, 2 + 3 + 3 missing
    lines = coverage(rows, target=3)
    by_system = {line.split(" | ")[1]: line for line in lines if line.startswith("| m |")}
    assert by_system["full"] == "| m | full | 4 / 4 | 0 | 0.0 |"
    assert by_system["ltri"] == f"| m | ltri | 1 / 4 | 8 | {8 * 36 / 3600:.1f} |"
