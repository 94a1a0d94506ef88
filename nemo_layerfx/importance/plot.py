"""Figures of probe reports: per-unit WER change (and churn), and the callback's heatmap over training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def plot_report(report: Any, path: str | Path) -> None:
    """PNG: WER change per unit and reset mode (heatmap); the change with its bootstrap interval per unit (ambient
    units marked); and the weight churn when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report.delta_wer)
    data = torch.tensor([report.delta_wer[m] for m in modes]).T.numpy()  # (units, modes)
    ci = getattr(report, "delta_ci", None) or {}
    panels = ["heat"] + (["ci"] if ci else []) + (["churn"] if report.churn else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 2.4 * len(panels), 1.2 + 0.32 * len(report.units)),
                             squeeze=False)
    ax = axes[0][0]
    im = ax.imshow(data, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_yticks(range(len(report.units)), report.units)
    for (i, j), v in __import__("numpy").ndenumerate(data):
        ax.text(j, i, f"{v:+.3f}", ha="center", va="center", fontsize=7,
                color="white" if v > data.max() * 0.6 else "black")
    ax.set_title(f"WER change (baseline {report.baseline_wer:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    if ci:
        axc = axes[0][panels.index("ci")]
        mode = modes[0]
        ys = list(range(len(report.units)))
        lo = [report.delta_wer[mode][i] - ci[mode][i][0] for i in ys]
        hi = [ci[mode][i][1] - report.delta_wer[mode][i] for i in ys]
        colors = ["tab:green" if u in report.ambient[mode] else "tab:red" for u in report.units]
        for y, x, l, h, c in zip(ys, report.delta_wer[mode], lo, hi, colors):
            axc.errorbar(x, y, xerr=[[l], [h]], fmt="o", color=c, capsize=2, ms=4)
        axc.axvline(0.0, color="gray", lw=0.8)
        axc.invert_yaxis()
        axc.set_yticks(ys, report.units, fontsize=7)
        level = report.config.get("ci_level", 0.95)
        axc.set_title(f"{mode}: WER change, {level:.0%} bootstrap CI\n(green: ambient)", fontsize=8)
    if report.churn:
        ax2 = axes[0][panels.index("churn")]
        layers = range(len(report.churn["block"]))
        for kind in ("attn", "conv", "ffn1", "ffn2"):
            ax2.plot(report.churn[kind], list(layers), marker="o", label=kind)
        ax2.invert_yaxis()
        ax2.set_xlabel("||W_t - W_0|| / max over layers")
        ax2.set_yticks(list(layers), [f"layers.{i}" for i in layers])
        ax2.legend(fontsize=7)
        ax2.set_title("weight churn", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> None:
    """Heatmap of WER change, units x probe points, one panel per reset mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(history[-1]["delta_wer"])
    units = history[-1]["units"]
    fig, axes = plt.subplots(1, len(modes), figsize=(1.5 + 1.2 * len(history) * len(modes) + 2,
                                                    1.2 + 0.3 * len(units)), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        data = np.array([h["delta_wer"][mode] for h in history]).T  # (units, probe points)
        im = ax.imshow(data, cmap="magma_r", aspect="auto")
        ax.set_xticks(range(len(history)), [f"step {h['step']}" for h in history], rotation=45, fontsize=7)
        ax.set_yticks(range(len(units)), units, fontsize=7)
        ax.set_title(f"{mode}: WER change", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
