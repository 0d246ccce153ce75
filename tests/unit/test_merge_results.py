"""benchmarks.merge_results: rows united on their identity, the destination's rows kept, run records deduplicated."""

import json
from pathlib import Path

import pytest

from benchmarks.merge_results import merge


def _row(system: str, index: int, score: float = 1.0) -> dict:
    return {"model": "m", "system": system, "task": "niah_single", "length": 4096, "seed": 1, "index": index,
            "split": "test", "score": score}


def _write(folder: Path, rows: list[dict], runs: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta.json").write_text(json.dumps({"runs": runs}))
    return folder


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_union_keeps_destination_rows_and_adds_only_new(tmp_path: Path) -> None:
    dest = _write(tmp_path / "dest", [_row("ltri", 0, 1.0)], [{"model": "m", "started": "a", "path": "/x/m.gguf"}])
    # two grids seeded from dest: both carry its row (one with another score, which must not win) plus new ones
    a = _write(tmp_path / "a", [_row("ltri", 0, 0.0), _row("ltri", 1)], [{"model": "m", "started": "b", "path": "/y/m.gguf"}])
    b = _write(tmp_path / "b", [_row("ltri", 0), _row("full", 0), _row("ltri", 1)], [{"model": "m", "started": "b"}])
    counts = merge(dest, [a, b])
    assert counts == {"before": 1, "added": 2, "after": 3, "runs": 2}
    rows = _rows(dest)
    assert [(r["system"], r["index"]) for r in rows] == [("ltri", 0), ("ltri", 1), ("full", 0)]
    assert rows[0]["score"] == 1.0
    runs = json.loads((dest / "meta.json").read_text())["runs"]
    assert [r["path"] for r in runs if "path" in r] == ["m.gguf", "m.gguf"]  # machine paths reduced to names
    assert merge(dest, [a, b])["added"] == 0  # idempotent


def test_bad_sources_leave_destination_unchanged(tmp_path: Path) -> None:
    dest = _write(tmp_path / "dest", [_row("ltri", 0)], [])
    before = (dest / "samples.jsonl").read_text()
    with pytest.raises(FileNotFoundError, match="nope"):
        merge(dest, [tmp_path / "nope"])
    bad = _write(tmp_path / "bad", [{"model": "m", "system": "ltri"}], [])
    with pytest.raises(ValueError, match="lacks"):
        merge(dest, [bad])
    assert (dest / "samples.jsonl").read_text() == before
