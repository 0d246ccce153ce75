"""Choose ltri's defaults on the dev split, then report the choice against the shipped defaults on the test split.

    python -m benchmarks.tune --model qwen=/tmp/m/qwen.gguf --tasks niah_multikey vt qa_squad \\
        --lengths 16384 32768 --samples 10 --out benchmarks/results/tuning_qwen --max-seconds 560 [--test]

One knob at a time around the current defaults (theta, span bounds, index vectors, window/budget split, consensus,
head voting, position scheme). Dev rows go to ``OUT/dev``; ``tuning.md`` / ``tuning.json`` rank the candidates by mean
dev score; ``--test`` then runs the winner and the defaults on the test split (``OUT/test``), so the reported number
is on samples the choice never saw. Resumable like :mod:`benchmarks.evaluate` (call again until done).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

from benchmarks.evaluate import SYSTEMS, System, add_run_args, parse_models, run_grid, system_config
from benchmarks.long_tasks import TASKS
from benchmarks.report import fmt_cell, load_rows


def candidates(window: int, budget: int) -> list[System]:
    """The default ltri plus one-knob variations (the working set sinks + window + budget stays the same)."""
    variants: dict[str, dict[str, Any]] = {
        "alpha_0.5": {"triangle_alpha": 0.5},
        "alpha_2": {"triangle_alpha": 2.0},
        "span_8_32": {"span_min_len": 8, "span_max_len": 32},
        "span_8_128": {"span_max_len": 128},
        "span_16_64": {"span_min_len": 16},
        "iv_static_4": {"index_vectors": "static"},
        "iv_dynamic_2_8": {"min_index_vectors": 2},
        "iv_dynamic_4_16": {"max_index_vectors": 16},
        "split_more_budget": {"local_window": window // 2, "budget": budget + window - window // 2},
        "split_more_window": {"local_window": window + budget // 2, "budget": budget - budget // 2},
        "consensus_0.25": {"consensus_weight": 0.25},
        "consensus_0.75": {"consensus_weight": 0.75},
        "no_consensus": {"consensus_weight": 0.0, "lookahead": False},
        "head_voting": {"voting": True},
        "pos_absolute": {"position_scheme": "absolute"},
        "pos_fixed": {"position_scheme": "fixed"},
    }
    return [SYSTEMS["ltri"]] + [System(f"ltri_{name}", "ltri", overrides) for name, overrides in variants.items()]


def rank(rows: list[dict[str, Any]]) -> list[tuple[str, float, list[float]]]:
    """Systems by mean score, best first (ties: the shipped default first, then by name)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        scores[r["system"]].append(float(r["score"]))
    ranked = [(name, sum(v) / len(v), v) for name, v in scores.items()]
    return sorted(ranked, key=lambda t: (-t[1], t[0] != "ltri", t[0]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--tasks", nargs="+", default=["niah_multikey", "vt", "qa_squad"], choices=TASKS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--test", action="store_true", help="after dev is complete, run winner + default on test")
    add_run_args(parser)
    args = parser.parse_args(argv)
    models = parse_models(parser, args.model)
    systems = candidates(args.window, args.budget)
    for system in systems:
        system_config(system, args)
    dev = argparse.Namespace(**{**vars(args), "systems": systems, "split": "dev", "out": args.out / "dev"})
    run_grid(models, dev)  # type: ignore[arg-type]
    rows = load_rows([dev.out])
    expected = len(models) * len(args.tasks) * len(args.lengths) * args.samples
    complete = all(sum(1 for r in rows if r["system"] == s.name) >= expected for s in systems)
    ranked = rank(rows)
    lines = ["| rank | system | dev score % [95% CI] (n) | overrides |", "|---:|---|---|---|"]
    by_name = {s.name: s for s in systems}
    for i, (name, _, scores) in enumerate(ranked, 1):
        lines.append(f"| {i} | {name} | {fmt_cell(scores)} | `{json.dumps(by_name[name].overrides)}` |")
    status = "complete" if complete else "INCOMPLETE (call again to finish the dev grid)"
    text = f"# Tuning on the dev split ({status})\n\n" + "\n".join(lines) + "\n"
    (args.out / "tuning.md").write_text(text, encoding="utf-8")
    best = by_name[ranked[0][0]]
    (args.out / "tuning.json").write_text(json.dumps(
        {"complete": complete, "best": best.name, "best_overrides": best.overrides,
         "ranking": [(name, mean, len(scores)) for name, mean, scores in ranked]}, indent=2))
    print(text)
    if args.test and complete:
        test = argparse.Namespace(**{**vars(args), "split": "test", "out": args.out / "test",
                                     "systems": [SYSTEMS["ltri"]] + ([best] if best.name != "ltri" else [])})
        run_grid(models, test)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
