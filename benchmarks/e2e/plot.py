"""``bench.png``: prefill seconds, ms/token and peak GPU memory vs length, one row of plots per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.e2e.report import ok_rows


def plot_results(result: dict[str, Any], path: Path) -> str | None:
    """Prefill seconds (log-log), ms/token and peak GPU memory vs length per mode; a note if it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    models = [m["name"] for m in result["models"]]
    if not models:
        return None
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        ax_pre, ax_dec, ax_mem = axes[row]
        for mode in result["meta"]["modes"]:
            pre = ok_rows(result["prefill"], model, mode)
            dec = ok_rows(result["decode"], model, mode)
            if pre:
                xs = sorted(pre)
                ax_pre.plot(xs, [pre[x]["seconds"] for x in xs], "o-", label=mode)
                if any(pre[x].get("peak_gib") for x in xs):
                    ax_mem.plot(xs, [pre[x].get("peak_gib") or float("nan") for x in xs], "o-", label=f"{mode} prefill")
            if dec:
                xs = sorted(dec)
                ax_dec.plot(xs, [dec[x]["median_ms"] for x in xs], "o-", label=mode)
                if any(dec[x].get("peak_gib") for x in xs):
                    ax_mem.plot(xs, [dec[x].get("peak_gib") or float("nan") for x in xs], "s--",
                                label=f"{mode} decode")
            for r in result["prefill"]:
                if r["model"] == model and r["mode"] == mode and r.get("status") == "OOM":
                    ax_pre.axvline(r["length"], color="grey", lw=0.6, ls=":")
        ax_pre.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds",
                   title=f"{model}: prefill")
        ax_dec.set(xscale="log", xlabel="context tokens", ylabel="ms / output token (median)",
                   title=f"{model}: decode")
        ax_mem.set(xscale="log", xlabel="tokens", ylabel="peak GPU GiB (weights included)",
                   title=f"{model}: peak GPU memory")
        if not ax_mem.get_lines():
            ax_mem.text(0.5, 0.5, "no GPU memory measured (CPU run)", ha="center", va="center",
                        transform=ax_mem.transAxes)
        ax_dec.set_ylim(bottom=0)
        for ax in (ax_pre, ax_dec, ax_mem):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{result['meta']['device']}, {result['meta']['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
