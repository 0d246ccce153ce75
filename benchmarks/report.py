"""Render a quality grid (``samples.jsonl`` of :mod:`benchmarks.evaluate`) as Markdown tables and plots.

    python -m benchmarks.report benchmarks/results/quality_h200 [more result dirs...] [--out DIR]

Writes ``report.md`` (headline table: mean score over tasks per model x length x system; then one table per
model x task), ``accuracy_vs_length_<model>.png`` and ``depth_heatmap_<model>_<task>.png`` (needle tasks). Every
cell shows the mean score, a 95% bootstrap interval and the sample count.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "book_austen")
SYSTEM_ORDER = ("full", "streaming", "infllm", "ltri", "rag", "rag_ws")


def load_rows(dirs: list[Path]) -> list[dict[str, Any]]:
    """Rows of every ``samples.jsonl`` under the given result directories (truncated lines skipped)."""
    rows = []
    for d in dirs:
        path = d / "samples.jsonl" if d.is_dir() else d
        if not path.exists():
            raise FileNotFoundError(f"no samples.jsonl at {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def bootstrap_ci(scores: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (seeded, so reports are reproducible)."""
    if not scores:
        raise ValueError("no scores")
    if len(scores) == 1:
        return scores[0], scores[0]
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choice(scores) for _ in range(n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[min(int(0.975 * reps), reps - 1)]


def fmt_cell(scores: list[float]) -> str:
    """``mean [lo, hi] (n)`` with scores in percent."""
    if not scores:
        return "-"
    mean = sum(scores) / len(scores)
    lo, hi = bootstrap_ci(scores)
    return f"{100 * mean:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] ({len(scores)})"


def _systems(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["system"] for r in rows}
    return [s for s in SYSTEM_ORDER if s in present] + sorted(present - set(SYSTEM_ORDER))


def _table(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Rows grouped by ``key`` x system. Where the rows span several tasks, a cell whose system lacks some of the
    tasks the row's other systems have is marked (its mean is over another task mix) and the gaps are listed."""
    systems = _systems(rows)
    groups: dict[Any, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    tasks: dict[Any, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        groups[r[key]][r["system"]].append(float(r["score"]))
        tasks[r[key]][r["system"]].add(r["task"])
    lines = [f"| {key} | " + " | ".join(systems) + " |", "|---:|" + "---:|" * len(systems)]
    gaps = []
    for value in sorted(groups):
        every = set().union(*tasks[value].values())
        cells = []
        for s in systems:
            cell = fmt_cell(groups[value].get(s, []))
            lacking = sorted(every - tasks[value][s]) if s in tasks[value] else []
            if lacking:
                cell += " *"
                gaps.append(f"{s} at {key} {value} lacks {', '.join(lacking)}")
            cells.append(cell)
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    if gaps:
        lines += ["", "\\* a mean over fewer tasks than the other systems': " + "; ".join(gaps) + "."]
    return lines


def coverage(rows: list[dict[str, Any]], target: int) -> list[str]:
    """Markdown: per model and system, how many of its (task, length) cells hold ``target`` samples, the rows still
    missing, and the worker-hours they would take at the mean seconds (prefill + decode) of that system and length
    so far (none where that system and length have no row yet)."""
    cells: dict[tuple, int] = defaultdict(int)
    seconds: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        cells[(r["model"], r["system"], r["task"], r["length"])] += 1
        seconds[(r["model"], r["system"], r["length"])].append(r.get("prefill_s", 0.0) + r.get("decode_s", 0.0))
    lines = [f"## Coverage: cells with {target} samples", "",
             "| model | system | cells complete | rows missing | worker-hours to finish |", "|---|---|---:|---:|---:|"]
    for model in sorted({k[0] for k in cells}):
        tasks = sorted({k[2] for k in cells if k[0] == model})
        lengths = sorted({k[3] for k in cells if k[0] == model})
        for system in _systems([r for r in rows if r["model"] == model]):
            grid = [(t, n) for t in tasks for n in lengths]
            done = sum(cells.get((model, system, t, n), 0) >= target for t, n in grid)
            missing = {n: sum(max(0, target - cells.get((model, system, t, n), 0)) for t in tasks) for n in lengths}
            hours = sum(m * _mean(seconds.get((model, system, n), [])) for n, m in missing.items()) / 3600
            lines.append(f"| {model} | {system} | {done} / {len(grid)} | {sum(missing.values())} | {hours:.1f} |")
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def render_markdown(rows: list[dict[str, Any]], target: int = 20) -> str:
    """The whole report as Markdown (with a coverage table against ``target`` samples per cell)."""
    out = ["# Long-context quality", "",
           "Score in percent (mean over samples; for multi-answer tasks the fraction of answers found), 95% "
           "bootstrap interval, sample count.", ""]
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    for model, mrows in sorted(by_model.items()):
        tasks = sorted({r["task"] for r in mrows})
        out += [f"## {model}: all tasks ({', '.join(tasks)})", ""] + _table(mrows, "length") + [""]
        for task in tasks:
            out += [f"### {model} / {task}", ""] + _table([r for r in mrows if r["task"] == task], "length") + [""]
        cost = defaultdict(list)
        for r in mrows:
            cost[(r["length"], r["system"])].append(r["prefill_s"])
        out += [f"### {model}: mean prefill seconds", "", "| length | system | prefill s | samples |",
                "|---:|---|---:|---:|"]
        for (length, system), values in sorted(cost.items()):
            out.append(f"| {length} | {system} | {sum(values) / len(values):.2f} | {len(values)} |")
        out.append("")
    out += coverage(rows, target) + [""]
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy-vs-length per model and depth x length heatmaps per needle task; returns the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'ltri-rag[bench]'); skipping plots")
        return []
    written = []
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in _systems(mrows):
            srows = [r for r in mrows if r["system"] == system]
            lengths = sorted({r["length"] for r in srows})
            means = [100 * sum(r["score"] for r in srows if r["length"] == n) /
                     max(1, sum(1 for r in srows if r["length"] == n)) for n in lengths]
            ax.plot(lengths, means, marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{model}: mean over tasks")
        ax.legend(fontsize=7)
        path = out / f"accuracy_vs_length_{model}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
        for task in sorted({r["task"] for r in mrows} & set(NEEDLE_TASKS)):
            trows = [r for r in mrows if r["task"] == task]
            systems = _systems(trows)
            lengths = sorted({r["length"] for r in trows})
            depths = sorted({r["depth"] for r in trows})
            fig, axes = plt.subplots(1, len(systems), figsize=(2.2 * len(systems) + 1, 3), squeeze=False)
            for ax, system in zip(axes[0], systems):
                grid = [[float("nan")] * len(lengths) for _ in depths]
                for i, d in enumerate(depths):
                    for j, n in enumerate(lengths):
                        cell = [r["score"] for r in trows if r["system"] == system and r["depth"] == d
                                and r["length"] == n]
                        if cell:
                            grid[i][j] = sum(cell) / len(cell)
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
                ax.set_title(system, fontsize=8)
                ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths], fontsize=6)
                ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=6)
            axes[0][0].set_ylabel("depth")
            fig.suptitle(f"{model} / {task}", fontsize=9)
            fig.tight_layout()
            path = out / f"depth_heatmap_{model}_{task}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+", help="result directories (or samples.jsonl files)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first directory)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--target", type=int, default=20, help="samples per cell the coverage table counts against")
    args = parser.parse_args(argv)
    rows = load_rows(args.dirs)
    if not rows:
        parser.error("no rows to report")
    out = args.out or (args.dirs[0] if args.dirs[0].is_dir() else args.dirs[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(rows, args.target)
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    if not args.no_plots:
        for path in plot(rows, out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
