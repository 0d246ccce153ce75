"""What the wrong answers on the needle tasks were: another needle's number, a number from nowhere, or none.

    python -m benchmarks.misses benchmarks/results/quality_h200/qwen --model qwen=PATH [--out misses.md]

Each missed row's sample is rebuilt (samples are pure functions of task, tokenizer, length, depth and seed) and its
prediction is classed:

* ``distractor``: a number planted for another key (the model read a needle, but the wrong one);
* ``partial``: some but not all of the asked numbers (multi-value / multi-query);
* ``cut short``: the first number is the asked number's first digits (at least two of them), then the answer
  stops;
* ``invented``: a number that is no needle's (any length);
* ``no number``: no number at all (the model did not answer).

A ``distractor`` miss says retrieval brought needles in but the model chose among them wrongly; a ``cut short`` one
that the needle reached the model but was not copied whole; ``invented`` and ``no number`` say the asked needle did
not reach the model.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from benchmarks.long_tasks import make_sample
from benchmarks.report import load_rows

NEEDLE = re.compile(r"special magic numbers? for ([\w-]+) is: (\d+)")
NUMBER = re.compile(r"\d{4,}")
ANY_NUMBER = re.compile(r"\d+")
KINDS = ("distractor", "partial", "cut short", "invented", "no number")


def classify(prediction: str, answers: list[str], context: str) -> str:
    """The kind of miss of ``prediction`` (see the module docstring)."""
    planted = {value for _, value in NEEDLE.findall(context)}
    found = set(NUMBER.findall(prediction))
    if found & set(answers):
        return "partial"
    if found & (planted - set(answers)):
        return "distractor"
    first = ANY_NUMBER.search(prediction)
    if first is None:
        return "no number"
    digits = first.group()
    if len(digits) >= 2 and any(a != digits and a.startswith(digits) for a in answers):
        return "cut short"
    return "invented"


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a Hub id, a model directory or a ``.gguf`` file (no weights loaded)."""
    from transformers import AutoTokenizer

    file = Path(path).expanduser()
    if file.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    return AutoTokenizer.from_pretrained(path)


def tabulate(counts: dict[tuple[str, str, int], Counter[str]]) -> str:
    """Markdown table: one line per (task, system, length) with the misses by kind."""
    lines = ["| task | system | length | misses | " + " | ".join(KINDS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(KINDS)]
    for (task, system, length), c in sorted(counts.items()):
        lines.append(f"| {task} | {system} | {length} | {sum(c.values())} | "
                     + " | ".join(str(c[k]) for k in KINDS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a result folder with samples.jsonl")
    parser.add_argument("--model", required=True, metavar="NAME=PATH", help="the model whose tokenizer built it")
    parser.add_argument("--systems", nargs="+", default=None, help="only these systems")
    parser.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = parser.parse_args(argv)
    name, _, path = args.model.partition("=")
    rows = [r for r in load_rows([args.results]) if r["model"] == name and r["task"].startswith("niah")
            and r["score"] < 1.0 and (args.systems is None or r["system"] in args.systems)]
    if not rows:
        parser.error(f"no missed needle rows of model {name!r} in {args.results}")
    tokenizer = load_tokenizer(path)
    counts: dict[tuple[str, str, int], Counter[str]] = defaultdict(Counter)
    cache: dict[tuple[Any, ...], str] = {}
    for r in rows:
        key = (r["task"], r["length"], r["depth"], r["seed"])
        if key not in cache:
            cache[key] = make_sample(r["task"], tokenizer, r["length"], r["depth"], r["seed"]).context
        counts[(r["task"], r["system"], r["length"])][classify(r["prediction"], r["answers"], cache[key])] += 1
    table = tabulate(counts)
    print(table)
    if args.out is not None:
        args.out.write_text(f"# Needle misses of {name}, by kind\n\n{__doc__.split('*', 1)[0].strip()}\n\n{table}\n",
                            encoding="utf-8")


if __name__ == "__main__":
    main()
