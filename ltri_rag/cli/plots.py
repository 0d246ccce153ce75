"""The PNG pictures of ``ltri-rag inspect`` and ``ltri-rag bench`` (matplotlib, the ``viz`` extra).

Every function takes plain numbers (NumPy arrays, lists of offsets), draws one figure and writes it to ``path``; none
of them runs a model. :func:`require_matplotlib` says clearly when matplotlib is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ltri_rag.cli.runtime import CliError

__all__ = ["plot_accuracy", "plot_attention_window", "plot_latency", "plot_layer_retrieval", "plot_span_text",
           "require_matplotlib"]

DPI = 110
SPAN_COLORS = ("#fde2a7", "#b9e3f5", "#cfeccb", "#f6c7d9", "#ddd3f2", "#f9d6b8")
"""Background colours of consecutive spans in :func:`plot_span_text` (cycled, so neighbours always differ)."""


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend.

    Raises:
        CliError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib
    except ImportError:
        raise CliError("the pictures need matplotlib: pip install 'ltri-rag[viz]' (or pip install matplotlib)") \
            from None
    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # missing glyphs: drawn as boxes, quietly
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    require_matplotlib().close(fig)
    return path


# ------------------------------------------------------------------------------------------------- inspect
def plot_attention_window(path: Path, dense: np.ndarray, start: int, spans: Sequence[tuple[int, int]], *,
                          layer: int, band_width: int, title: str = "") -> Path:
    """The attention map of a window (rows: queries, columns: keys, document token offsets) with its triangle spans.

    Args:
        path: The PNG to write.
        dense: ``[L, L]`` head-mean attention of the window's queries on its keys (zero outside the engine's band).
        start: Document offset of the window's first token.
        spans: ``(token_start, token_end)`` document offsets of the spans, clipped to the window.
        layer: The layer (for the title).
        band_width: Keys per row the engine keeps (for the title).
        title: First title line (e.g. the document).
    """
    plt = require_matplotlib()
    from matplotlib.colors import PowerNorm
    from matplotlib.patches import Polygon

    n = dense.shape[0]
    end = start + n
    shown = np.ma.masked_where(dense <= 0, dense)
    vmax = float(np.quantile(dense[dense > 0], 0.995)) if (dense > 0).any() else 1.0
    fig, ax = plt.subplots(figsize=(7.6, 7.0))
    image = ax.imshow(shown, cmap="magma_r", norm=PowerNorm(0.5, vmin=0.0, vmax=max(vmax, 1e-6)),
                      extent=(start - 0.5, end - 0.5, end - 0.5, start - 0.5), interpolation="nearest")
    for s, e in spans:
        ax.add_patch(Polygon([(s - 0.5, s - 0.5), (s - 0.5, e - 0.5), (e - 0.5, e - 0.5)], closed=True, fill=False,
                             edgecolor="#1f77b4", linewidth=1.3))
    ax.set_xlabel("key token (offset in the document)")
    ax.set_ylabel("query token (offset in the document)")
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}layer {layer}: head-mean attention (the {band_width}-key band the engine keeps) and the "
                 f"{len(spans)} triangle spans it cut", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="attention probability")
    fig.tight_layout()
    return _save(fig, path)


def _printable(ch: str) -> str:
    if ch == "\t":
        return " "
    return ch if ch.isprintable() else "·"


def _wrap(text: str, width: int) -> list[list[int]]:
    """Character indices of ``text`` per display line: newlines break lines, long lines wrap at ``width``."""
    lines: list[list[int]] = [[]]
    for i, ch in enumerate(text):
        if ch == "\n":
            lines.append([])
            continue
        if len(lines[-1]) >= width:
            lines.append([])
        lines[-1].append(i)
    return lines


def plot_span_text(path: Path, text: str, char_start: int, spans: Sequence[tuple[int, int]], *, layer: int,
                   title: str = "", width: int = 100, max_lines: int = 60) -> Path:
    """The text of a window with every span on its own background colour and a bar where each span starts.

    Args:
        path: The PNG to write.
        text: The window's text.
        char_start: Its offset in the document (spans are document character offsets).
        spans: ``(char_start, char_end)`` of the spans, in order.
        layer: The layer whose spans these are (for the title).
        title: First title line.
        width: Characters per display line.
        max_lines: Display lines drawn at most (the rest is cut, and the title says so).
    """
    plt = require_matplotlib()
    from matplotlib.patches import Rectangle

    owner = np.full(len(text), -1, dtype=np.int64)
    for k, (s, e) in enumerate(spans):
        owner[max(0, s - char_start):max(0, e - char_start)] = k
    lines = _wrap(text, width)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    char_w, line_h = 0.0765, 0.205  # inches per character (monospace, 9 pt) and per line
    fig = plt.figure(figsize=(width * char_w + 0.6, len(lines) * line_h + 0.9))
    ax = fig.add_axes((0.3 / (width * char_w + 0.6), 0.2 / (len(lines) * line_h + 0.9),
                       width * char_w / (width * char_w + 0.6), len(lines) * line_h / (len(lines) * line_h + 0.9)))
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    for row, idx in enumerate(lines):
        col = 0
        while col < len(idx):
            k = owner[idx[col]]
            run = col
            while run < len(idx) and owner[idx[run]] == k:
                run += 1
            if k >= 0:
                ax.add_patch(Rectangle((col, row + 0.04), run - col, 0.92, linewidth=0,
                                       facecolor=SPAN_COLORS[k % len(SPAN_COLORS)]))
                if idx[col] + char_start == spans[k][0]:
                    ax.plot([col, col], [row + 0.02, row + 0.98], color="#c0392b", linewidth=1.2)
            col = run
        for col, i in enumerate(idx):
            ax.text(col + 0.5, row + 0.55, _printable(text[i]), fontsize=9, family="monospace", ha="center",
                    va="center")
    head = f"{title}\n" if title else ""
    more = f" (first {max_lines} lines)" if cut else ""
    fig.suptitle(f"{head}layer {layer}: the {len(spans)} stored spans over the text{more}; a red bar starts each "
                 "span", fontsize=9, y=1 - 0.1 / (len(lines) * line_h + 0.9))
    return _save(fig, path)


def plot_layer_retrieval(path: Path, scores: np.ndarray, layers: Sequence[int], *, question: str,
                         regions: Sequence[tuple[int, int, int]] = (), score_name: str = "score",
                         title: str = "", elsewhere: Sequence[float] | None = None, note: str = "") -> Path:
    """Per layer, the score each position of the document got for a question (the score of the span holding it).

    Args:
        path: The PNG to write.
        scores: ``[num_layers, num_tokens]`` (NaN where a layer scored no span).
        layers: Layer index of each row.
        question: The question (for the title).
        regions: ``(rank, token_start, token_end)`` of the regions the merged retrieval cites from this document.
        score_name: What the colour is (the ranking's name).
        title: First title line (e.g. the document).
        elsewhere: Per layer, the share of its scores that went to other documents (a side bar), or None.
        note: A line under the plot (e.g. the regions cited from other documents).
    """
    plt = require_matplotlib()
    from matplotlib.colors import PowerNorm

    num_layers, num_tokens = scores.shape
    finite = scores[np.isfinite(scores)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    wide = elsewhere is not None
    fig, axes = plt.subplots(1, 2 if wide else 1, figsize=(11.5, 0.22 * num_layers + 2.4), squeeze=False,
                             gridspec_kw={"width_ratios": [12, 1]} if wide else None)
    ax = axes[0][0]
    image = ax.imshow(np.ma.masked_invalid(scores), aspect="auto", cmap="viridis", interpolation="nearest",
                      norm=PowerNorm(0.5, vmin=0.0, vmax=vmax), extent=(-0.5, num_tokens - 0.5, num_layers - 0.5, -0.5))
    ax.set_yticks(range(num_layers), [str(layer) for layer in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel("token offset in the document")
    for rank, s, e in regions:
        ax.axvspan(s - 0.5, e - 0.5, ymin=0.985, ymax=1.0, color="#e74c3c", clip_on=False)
        ax.annotate(f"#{rank}", ((s + e) / 2, -0.5), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, color="#c0392b", annotation_clip=False)
        ax.axvline(s - 0.5, color="#e74c3c", linewidth=0.6, alpha=0.7)
        ax.axvline(e - 0.5, color="#e74c3c", linewidth=0.6, alpha=0.7)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label=score_name)
    if wide:
        side = axes[0][1]
        side.barh(range(num_layers), list(elsewhere or ()), color="#95a5a6")
        side.set_ylim(num_layers - 0.5, -0.5)
        side.set_yticks([])
        side.set_xlim(0, 1)
        side.set_xticks([0, 1], ["0", "1"])
        side.set_xlabel("score on other\ndocuments", fontsize=8)
        side.tick_params(labelsize=7)
    head = f"{title}\n" if title else ""
    q = question if len(question) <= 90 else question[:89] + "…"
    ax.set_title(f"{head}question: {q!r}\nper-layer {score_name} of each span (red: the regions cited, best first)",
                 fontsize=9, pad=14 if regions else 6)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------- bench
def _length_ticks(ax: Any, lengths: set[int]) -> None:
    """Ticks at the measured lengths, labelled ``4K``, ``128K``... (a log-2 axis)."""
    ticks = sorted(lengths)
    if ticks:
        ax.set_xticks(ticks, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in ticks])
        ax.minorticks_off()


def plot_accuracy(path: Path, series: Mapping[str, Mapping[int, float]], *, title: str,
                  counts: Mapping[str, Mapping[int, int]] | None = None) -> Path:
    """Mean score (percent) against context length, one line per system.

    Args:
        series: ``{system: {length: mean score in [0, 1]}}``.
        title: The figure's title.
        counts: ``{system: {length: samples}}`` (the legend gives each system's total).
    """
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for system, points in sorted(series.items()):
        xs = sorted(points)
        total = sum((counts or {}).get(system, {}).values())
        label = f"{system} ({total} samples)" if total else system
        ax.plot(xs, [100 * points[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    _length_ticks(ax, {n for points in series.values() for n in points})
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(path: Path, prefill: Mapping[str, Mapping[int, float]], decode: Mapping[str, Mapping[int, float]],
                 *, title: str) -> Path:
    """Prefill seconds and decode milliseconds per token against length, one line per mode.

    Args:
        prefill: ``{mode: {prompt tokens: seconds}}``.
        decode: ``{mode: {context tokens: median ms per token}}``.
        title: The figure's title.
    """
    plt = require_matplotlib()
    fig, (ax_pre, ax_dec) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data in ((ax_pre, prefill), (ax_dec, decode)):
        for mode, points in sorted(data.items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        _length_ticks(ax, {n for points in data.values() for n in points})
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_pre.set_yscale("log")
    ax_pre.set(xlabel="prompt tokens", ylabel="prefill seconds", title="prefill")
    ax_dec.set(xlabel="context tokens", ylabel="ms / output token (median)", title="decode")
    ax_dec.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
