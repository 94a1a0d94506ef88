"""Figures of probe reports: per-unit WER change (and churn), and the callback's heatmap over training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

def plot_report(report: Any, path: str | Path) -> None:
    """PNG: WER change per unit and reset mode (heatmap), with the weight churn beside it when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report.delta_wer)
    data = torch.tensor([report.delta_wer[m] for m in modes]).T.numpy()  # (units, modes)
    ncols = 2 if report.churn else 1
    fig, axes = plt.subplots(1, ncols, figsize=(3 + 2.2 * ncols, 1.2 + 0.32 * len(report.units)), squeeze=False)
    ax = axes[0][0]
    im = ax.imshow(data, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_yticks(range(len(report.units)), report.units)
    for (i, j), v in __import__("numpy").ndenumerate(data):
        ax.text(j, i, f"{v:+.3f}", ha="center", va="center", fontsize=7,
                color="white" if v > data.max() * 0.6 else "black")
    ax.set_title(f"WER change (baseline {report.baseline_wer:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    if report.churn:
        ax2 = axes[0][1]
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
