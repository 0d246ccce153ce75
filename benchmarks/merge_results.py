"""Merge grid results gathered from several runs (device sessions, grids split by task) into one results folder.

    python -m benchmarks.merge_results benchmarks/results/quality_h200/qwen /tmp/res/qwen_ltri /tmp/res/qwen_base

Every folder holds ``samples.jsonl`` (one row per sample) and ``meta.json`` (``{"runs": [...]}``). Rows are united
on their identity (model, system, task, length, seed, index, split): a row already in the destination is kept as it
is, so merging the same folder twice changes nothing, and a grid seeded from the destination's rows adds only the
rows it ran. Run records are united on (model, started), with model paths reduced to file names (no machine paths
in the repository). The destination is rewritten only after every source was read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KEY_FIELDS = ("model", "system", "task", "length", "seed", "index", "split")


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The identity of a sample row (``KEY_FIELDS`` and the needle depth where the row has one: the same seed at
    another depth is another prompt); raises ``ValueError`` naming the field a row lacks."""
    missing = [f for f in KEY_FIELDS if f not in row]
    if missing:
        raise ValueError(f"row lacks {missing}: {json.dumps(row)[:200]}")
    return (*(row[f] for f in KEY_FIELDS), row.get("depth"))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``samples.jsonl`` (empty when the file does not exist)."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err})") from err
    return rows


def _clean_run(run: dict[str, Any]) -> dict[str, Any]:
    run = dict(run)
    if isinstance(run.get("path"), str):
        run["path"] = Path(run["path"]).name
    return run


def merge(dest: Path, sources: list[Path]) -> dict[str, int]:
    """Unite ``sources`` into ``dest`` (created if needed); returns counts: rows before, added, after, runs."""
    rows = read_rows(dest / "samples.jsonl")
    seen = {row_key(r) for r in rows}
    before = len(rows)
    meta_path = dest / "meta.json"
    runs = [_clean_run(r) for r in (json.loads(meta_path.read_text())["runs"] if meta_path.exists() else [])]
    run_keys = {(r.get("model"), r.get("started")) for r in runs}
    for src in sources:
        if not src.is_dir():
            raise FileNotFoundError(f"not a results folder: {src}")
        for row in read_rows(src / "samples.jsonl"):
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                rows.append(row)
        src_meta = src / "meta.json"
        for run in json.loads(src_meta.read_text())["runs"] if src_meta.exists() else []:
            run = _clean_run(run)
            if (run.get("model"), run.get("started")) not in run_keys:
                run_keys.add((run.get("model"), run.get("started")))
                runs.append(run)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "samples.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(dest / "samples.jsonl")
    meta_path.write_text(json.dumps({"runs": runs}, indent=2) + "\n", encoding="utf-8")
    return {"before": before, "added": len(rows) - before, "after": len(rows), "runs": len(runs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="results folder to merge into")
    parser.add_argument("sources", type=Path, nargs="+", help="results folders to merge from")
    args = parser.parse_args(argv)
    counts = merge(args.dest, args.sources)
    print(f"{args.dest}: {counts['before']} rows + {counts['added']} new = {counts['after']}; {counts['runs']} runs")


if __name__ == "__main__":
    main()
