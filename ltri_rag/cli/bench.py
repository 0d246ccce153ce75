"""``ltri-rag bench``: plots of the benchmark results committed in the repository (``benchmarks/results``).

It runs no benchmark: it reads result files and draws them.

* every ``samples.jsonl`` whose rows are quality samples (``model``, ``system``, ``length``, ``score``: the output of
  ``python -m benchmarks.evaluate``) becomes ``accuracy_<folder>.png``: mean score against context length per system;
* every ``bench.json`` of the end-to-end benchmark (``prefill`` and ``decode`` rows: ``python -m
  benchmarks.bench_e2e``) becomes ``latency_<folder>.png``: prefill seconds and decode ms/token against length per
  mode (rows whose status is not ``ok`` are left out).

``<folder>`` is the file's folder relative to ``--results``, with ``/`` turned into ``_``. Other files are skipped.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ltri_rag.cli.runtime import CliError, Output, UsageError

__all__ = ["DEFAULT_RESULTS", "accuracy_series", "cmd_bench", "latency_series"]

DEFAULT_RESULTS = "benchmarks/results"
DEFAULT_OUT = "ltri-bench"
_QUALITY_KEYS = ("system", "length", "score")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank and truncated lines skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def accuracy_series(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, int]]]:
    """``({system: {length: mean score}}, {system: {length: samples}})`` of quality rows (others ignored)."""
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if all(key in row for key in _QUALITY_KEYS) and isinstance(row["score"], (int, float)):
            sums[str(row["system"])][int(row["length"])].append(float(row["score"]))
    means = {s: {n: sum(v) / len(v) for n, v in by_len.items()} for s, by_len in sums.items()}
    counts = {s: {n: len(v) for n, v in by_len.items()} for s, by_len in sums.items()}
    return means, counts


def latency_series(result: dict[str, Any]) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]], str]:
    """``(prefill {mode: {length: s}}, decode {mode: {length: median ms}}, title)`` of an end-to-end ``bench.json``
    (one model: the first; rows not ``ok`` skipped)."""
    models = [m.get("name") for m in result.get("models", []) if isinstance(m, dict)]
    model = models[0] if models else None
    prefill: dict[str, dict[int, float]] = defaultdict(dict)
    decode: dict[str, dict[int, float]] = defaultdict(dict)
    for key, value_key, into in (("prefill", "seconds", prefill), ("decode", "median_ms", decode)):
        for row in result.get(key, []):
            if (isinstance(row, dict) and row.get("status", "ok") == "ok" and row.get("model", model) == model
                    and isinstance(row.get(value_key), (int, float))):
                into[str(row["mode"])][int(row["length"])] = float(row[value_key])
    meta = result.get("meta", {}) if isinstance(result.get("meta"), dict) else {}
    where = ", ".join(str(meta[k]) for k in ("device", "dtype") if meta.get(k))
    title = f"{model or 'model'}" + (f" ({where})" if where else "")
    return dict(prefill), dict(decode), title


def _name(path: Path, root: Path) -> str:
    rel = path.parent.relative_to(root)
    return "_".join(rel.parts) or root.resolve().name


def cmd_bench(args: argparse.Namespace, out: Output) -> int:
    """Render the accuracy and latency plots of the result files under ``--results`` into ``--out``."""
    from ltri_rag.cli import plots

    plots.require_matplotlib()
    root = Path(args.results).expanduser()
    if not root.is_dir():
        hint = " (run it from a clone of the repository, or pass --results DIR)" if args.results == DEFAULT_RESULTS \
            else ""
        raise UsageError(f"--results {args.results!r} is not a folder{hint}")
    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    written: list[dict[str, Any]] = []
    for path in sorted(root.rglob("samples.jsonl")):
        means, counts = accuracy_series(_read_jsonl(path))
        if not means:
            continue
        name = _name(path, root)
        models = sorted({str(r.get("model")) for r in _read_jsonl(path) if r.get("model")})
        title = f"{', '.join(models) or name}: mean score over tasks ({path.relative_to(root)})"
        file = plots.plot_accuracy(out_dir / f"accuracy_{name}.png", means, title=title, counts=counts)
        written.append({"kind": "accuracy", "source": str(path), "file": str(file)})
    for path in sorted(root.rglob("bench.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CliError(f"{path}: not readable JSON ({err})") from None
        if not isinstance(result, dict) or not ("prefill" in result or "decode" in result):
            continue
        prefill, decode, title = latency_series(result)
        if not prefill and not decode:
            continue
        name = _name(path, root)
        file = plots.plot_latency(out_dir / f"latency_{name}.png", prefill, decode,
                                  title=f"{title}: {path.relative_to(root)}")
        written.append({"kind": "latency", "source": str(path), "file": str(file)})
    if not written:
        raise CliError(f"no quality samples.jsonl or end-to-end bench.json under {str(root)!r}: nothing to plot")
    out.json({"results": str(root), "out": str(out_dir), "plots": written})
    for item in written:
        out.text(f"{item['kind']:<9} {item['source']} -> {item['file']}")
    out.text(f"{len(written)} plot(s) in {out_dir}")
    return 0
