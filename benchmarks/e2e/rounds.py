"""``--rounds N``: every mode measured in N processes, in a rotated order each round, then one row per mode and
length holding the median over the rounds.

Why: with one process per mode, the order of the processes still showed in session 34. Three modes in the same
order in two calls gave 128K prefills of 14.2 / 11.7 / 11.2 s and 14.4 / 13.6 / 12.4 s. One of the three settings
could not act on a prefill at all, so the first process was slowest for reasons outside the code under test. Round
``r`` starts at mode ``r mod len(modes)``, so each mode runs first once in ``len(modes)`` rounds. The merged row
keeps every round's figures (``round_*`` lists), so the spread is visible next to the median.
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["DECODE_KEYS", "DETAIL_KEYS", "PREFILL_KEYS", "merge_rounds", "rotated", "rounds_table"]

# the figures a merged row takes as the median over its rounds (each round's values kept as ``round_<key>``)
PREFILL_KEYS = ("seconds",)
DECODE_KEYS = ("median_ms", "mean_ms", "loop_sync_ms", "loop_ms")
# per-round detail a merged row keeps for every round as ``round_<key>`` (its own value stays the first round's)
DETAIL_KEYS = ("repeat_seconds", "step_kinds")


def rotated(modes: list[str], round_index: int) -> list[str]:
    """The order in which round ``round_index`` runs ``modes``: a rotation starting at ``round_index mod len``."""
    if not modes:
        return []
    start = round_index % len(modes)
    return modes[start:] + modes[:start]


def merge_rounds(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per (model, mode, length, phase) from rows tagged with ``round``, in the order of first appearance.

    A group's ``ok`` rows are merged: the first of them, with each of ``keys`` replaced by the median over the rounds
    and the per-round values kept as ``round_<key>``, ``rounds`` (how many were ok of how many ran), ``peak_gib`` the
    largest of the rounds, ``min_ms`` / ``max_ms`` over every round's steps, and the figures derived from ``seconds`` /
    ``median_ms`` (``tokens_per_s``, ``x_floor``) recomputed from the medians. Raw per-step detail (``times_ms``,
    ``repeat_seconds``, ``step_kinds``) stays the first ok round's; the last two are kept for every round too
    (:data:`DETAIL_KEYS`). A group without an ``ok`` row keeps its first row. Rows without ``round`` pass through
    unchanged.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    order: list[tuple[Any, ...] | int] = []
    for index, row in enumerate(rows):
        if "round" not in row:
            order.append(index)
            continue
        key = (row.get("model"), row.get("mode"), row.get("length"), row.get("phase"))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(row)
    out: list[dict[str, Any]] = []
    for item in order:
        if isinstance(item, int):
            out.append(rows[item])
            continue
        group = groups[item]
        ok = [r for r in group if r.get("status") == "ok"]
        if not ok:
            out.append({k: v for k, v in group[0].items() if k not in ("round", "position")})
            continue
        merged = {k: v for k, v in ok[0].items() if k not in ("round", "position")}
        merged["rounds"] = f"{len(ok)} of {len(group)}"
        merged["round_order"] = [r["round"] for r in ok]
        merged["round_position"] = [r.get("position") for r in ok]
        for key in keys:
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            if values:
                merged[key] = statistics.median(values)
                merged[f"round_{key}"] = values
        for key in DETAIL_KEYS:  # per-round detail, kept whole (the merged row's own is the first round's)
            if any(key in r for r in ok):
                merged[f"round_{key}"] = [r.get(key) for r in ok]
        peaks = [r["peak_gib"] for r in ok if isinstance(r.get("peak_gib"), (int, float))]
        if peaks:
            merged["peak_gib"] = max(peaks)
        for key, pick in (("min_ms", min), ("max_ms", max)):  # over every round, so that they bound the medians
            values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
            if values:
                merged[key] = pick(values)
        _rederive(merged)
        out.append(merged)
    return out


def _rederive(row: dict[str, Any]) -> None:
    """Figures computed from ``seconds`` / ``median_ms``, recomputed after those became medians."""
    if row.get("phase") == "prefill" and row.get("seconds"):
        row["tokens_per_s"] = row["length"] / row["seconds"]
        if row.get("floor_s"):
            row["x_floor"] = row["seconds"] / row["floor_s"]
    if row.get("phase") == "decode" and row.get("median_ms") and row.get("floor_weights_kv_ms"):
        row["x_floor"] = row["median_ms"] / row["floor_weights_kv_ms"]


def rounds_table(prefill: list[dict[str, Any]], decode: list[dict[str, Any]], model: str) -> list[str]:
    """Markdown lines: each merged row's per-round figures (empty when the run had one round)."""
    rows = [r for r in prefill + decode if r.get("model") == model and "round_order" in r]
    if not rows:
        return []
    lines = ["Rounds (each mode in a process of its own per round, the order rotated each round; the tables above "
             "hold the medians). Per round, in the order the rounds ran; `position`: the mode's place in its round "
             "(1 = its round's first process):", "",
             "| mode | length | phase | position | prefill s | decode median ms | decode mean ms | "
             "loop one ahead ms |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        figures = " | ".join(_per_round(r, key) for key in ("seconds", "median_ms", "mean_ms", "loop_ms"))
        lines.append(f"| {r['mode']} | {r['length']:,} | {r['phase']} | "
                     f"{' / '.join(str(i) for i in r['round_position'])} | {figures} |")
    return lines + [""]


def _per_round(row: dict[str, Any], key: str) -> str:
    """``row``'s ``round_<key>`` values joined with `` / ``, or ``-`` where the row has none."""
    values = row.get(f"round_{key}")
    return " / ".join(f"{v:.2f}" for v in values) if values else "-"
