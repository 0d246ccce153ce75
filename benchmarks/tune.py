"""Choose ltri's defaults on the dev split, then report the choice against the shipped defaults on the test split.

    python -m benchmarks.tune --model qwen=/tmp/m/qwen.gguf --tasks niah_multikey vt qa_squad \\
        --lengths 16384 32768 --samples 10 --out benchmarks/results/tuning_qwen --max-seconds 560 [--test]

One knob at a time around the current defaults (theta, span bounds, index vectors, window/budget split, consensus,
persistence, head voting, position scheme). Dev rows go to ``OUT/dev``; ``tuning.md`` / ``tuning.json`` rank the
candidates by mean dev score and compare each with the shipped default on the same dev samples (paired differences,
a seeded bootstrap interval, wins and losses). A candidate replaces the default only if it is complete on dev and
the lower end of its paired interval is above zero: on a few dozen samples most one-knob differences are noise, and
a default chosen on noise does not carry to held-out cases. ``--test`` then runs the chosen system and the default
on the test split (``OUT/test``), so the reported number is on samples the choice never saw. Resumable like
:mod:`benchmarks.evaluate` (call again until done); ``--report-only`` renders the tables from the rows already there.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from benchmarks.evaluate import (SYSTEMS, System, add_run_args, parse_models, run_grid, sample_key, sample_plan,
                                 system_config)
from benchmarks.long_tasks import ALL_TASKS
from benchmarks.report import bootstrap_ci, fmt_cell, load_rows


def candidates(window: int, budget: int) -> list[System]:
    """The default ltri plus one-knob variations (the working set sinks + window + budget stays the same, except
    ``pin_extra_budget``: while decoding, the prompt's spans come on top of the budget)."""
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
        "no_persistence": {"persistence": False},
        "persistence_bonus_2": {"persistence_bonus": 2.0},
        "persistence_decay_0.8": {"persistence_decay": 0.8},
        "pin_prompt_spans": {"pin_prompt_spans": True},
        "pin_extra_budget": {"pin_prompt_spans": True, "pin_extra_budget": True},  # decode working set grows
        "pos_absolute": {"position_scheme": "absolute"},
        "pos_fixed": {"position_scheme": "fixed"},
    }
    return [SYSTEMS["ltri"]] + [System(f"ltri_{name}", "ltri", overrides) for name, overrides in variants.items()]


def grid_rows(rows: list[dict[str, Any]], models: list[str], tasks: list[str], lengths: list[int], samples: int,
              systems: list[str]) -> tuple[list[dict[str, Any]], bool]:
    """The dev rows of this grid only (rows an earlier call left for other models, tasks, lengths, systems or sample
    plans are set aside), and whether every cell of it has its row."""
    plan = {(seed, depth) for _, depth, seed in sample_plan(samples, "dev")}
    wanted = [r for r in rows if r.get("model") in models and r["task"] in tasks and r["length"] in lengths
              and r["system"] in systems and (r["seed"], r.get("depth")) in plan]
    have = {sample_key(r) for r in wanted}
    complete = all((m, s, t, n, seed, depth) in have for m in models for s in systems for t in tasks
                   for n in lengths for seed, depth in plan)
    return wanted, complete


def rank(rows: list[dict[str, Any]]) -> list[tuple[str, float, list[float]]]:
    """Systems by mean score, best first (ties: the shipped default first, then by name)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        scores[r["system"]].append(float(r["score"]))
    ranked = [(name, sum(v) / len(v), v) for name, v in scores.items()]
    return sorted(ranked, key=lambda t: (-t[1], t[0] != "ltri", t[0]))


@dataclass(frozen=True)
class Paired:
    """A candidate against the default on the dev samples both have (keyed by model, task, length, seed).

    Attributes:
        name: Candidate system.
        n: Samples in common.
        diff: Mean score difference, candidate minus default (fraction, not percent).
        lo: Lower end of the 95% bootstrap interval of ``diff``.
        hi: Upper end.
        wins: Samples where the candidate scored higher.
        losses: Samples where it scored lower.
    """

    name: str
    n: int
    diff: float
    lo: float
    hi: float
    wins: int
    losses: int


def paired(rows: list[dict[str, Any]], default: str = "ltri", reps: int = 2000, seed: int = 0) -> list[Paired]:
    """Each candidate's paired difference with ``default``, best mean difference first."""
    by_system: dict[str, dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        # depth too: the same seed at another depth (another --samples) is another prompt, not a pair
        by_system[r["system"]][(r.get("model"), r["task"], r["length"], r["seed"], r.get("depth"))] = float(r["score"])
    base = by_system.get(default, {})
    out = []
    for name, scores in by_system.items():
        if name == default:
            continue
        diffs = [scores[key] - base[key] for key in scores if key in base]
        if not diffs:
            continue
        lo, hi = bootstrap_ci(diffs, reps, seed)
        out.append(Paired(name, len(diffs), sum(diffs) / len(diffs), lo, hi, sum(d > 0 for d in diffs),
                          sum(d < 0 for d in diffs)))
    return sorted(out, key=lambda p: (-p.diff, p.name))


def choose(comparisons: list[Paired], complete: bool, default: str = "ltri") -> str:
    """The candidate whose paired interval lies above zero (the largest such gain), else ``default``."""
    if not complete:
        return default
    sure = [p for p in comparisons if p.lo > 0]
    return max(sure, key=lambda p: (p.lo, p.diff)).name if sure else default


def render(rows: list[dict[str, Any]], systems: list[System], complete: bool) -> tuple[str, dict[str, Any]]:
    """``tuning.md`` text and ``tuning.json`` content from the dev rows."""
    by_name = {s.name: s for s in systems}
    ranked = rank(rows)
    comparisons = paired(rows)
    chosen = choose(comparisons, complete)
    status = "complete" if complete else "INCOMPLETE (call again to finish the dev grid)"
    lines = [f"# Tuning on the dev split ({status})", "",
             f"Chosen: **{chosen}** (a candidate replaces the default `ltri` only when complete on dev and its "
             "paired 95% interval is above zero).", "",
             "## Mean dev score", "",
             "| rank | system | dev score % [95% CI] (n) | overrides |", "|---:|---|---|---|"]
    for i, (name, _, scores) in enumerate(ranked, 1):
        overrides = by_name[name].overrides if name in by_name else {}
        lines.append(f"| {i} | {name} | {fmt_cell(scores)} | `{json.dumps(overrides)}` |")
    lines += ["", "## Paired with the default on the same samples", "",
              "| system | n | difference, points [95% CI] | wins | losses |", "|---|---:|---:|---:|---:|"]
    for p in comparisons:
        lines.append(f"| {p.name} | {p.n} | {100 * p.diff:+.1f} [{100 * p.lo:+.1f}, {100 * p.hi:+.1f}] | {p.wins} "
                     f"| {p.losses} |")
    best = by_name.get(chosen, by_name["ltri"])
    data = {"complete": complete, "best": best.name, "best_overrides": best.overrides,
            "ranking": [(name, mean, len(scores)) for name, mean, scores in ranked],
            "paired": [vars(p) for p in comparisons]}
    return "\n".join(lines) + "\n", data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--tasks", nargs="+", default=["niah_multikey", "vt", "qa_squad"], choices=ALL_TASKS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--test", action="store_true", help="after dev is complete, run the choice + default on test")
    parser.add_argument("--report-only", action="store_true", help="render tuning.md from the dev rows; run nothing")
    add_run_args(parser)
    args = parser.parse_args(argv)
    models = parse_models(parser, args.model)
    systems = candidates(args.window, args.budget)
    for system in systems:
        system_config(system, args)
    dev = argparse.Namespace(**{**vars(args), "systems": systems, "split": "dev", "out": args.out / "dev"})
    if not args.report_only:
        run_grid(models, dev)  # type: ignore[arg-type]
    rows, complete = grid_rows(load_rows([dev.out]), [name for name, _ in models], args.tasks, args.lengths,
                               args.samples, [s.name for s in systems])
    text, data = render(rows, systems, complete)
    (args.out / "tuning.md").write_text(text, encoding="utf-8")
    (args.out / "tuning.json").write_text(json.dumps(data, indent=2))
    print(text)
    if args.test and complete and not args.report_only:
        best = next(s for s in systems if s.name == data["best"])
        test = argparse.Namespace(**{**vars(args), "split": "test", "out": args.out / "test",
                                     "systems": [SYSTEMS["ltri"]] + ([best] if best.name != "ltri" else [])})
        run_grid(models, test)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
