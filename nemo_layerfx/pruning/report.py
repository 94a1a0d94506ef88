"""Survival report of a gated model (Kubo et al.'s Fig. 2): per layer and gated kind, the share of units that
survive (β ≥ c∞) and the expected retention (mean σ(β)), with the effective parameter count.

``as_probe_report`` turns it into the shape of a block-level probe report (lower survival ranks as more
ambient), so a survival report can drive a federated-dropout plan the way a probe does:
``DropoutPlan.targeted(as_probe_report(survival), n=2, rate=0.5, mode="survival")``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from nemo_layerfx.pruning.apply import gated_encoder, gates_of


@dataclass
class SurvivalReport:
    kinds: list[str]
    survival: dict[str, list[float]]  # kind -> per layer: share of units with β >= c_inf
    expected: dict[str, list[float]]  # kind -> per layer: mean σ(β)
    effective_params: int  # parameters of the model `prune` would build
    dense_params: int  # parameters without the gates, every unit kept
    step: int
    target: float  # c(t) at that step

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        head = f"{'layer':<10}" + "".join(f"{k + ' kept':>12}{k + ' E[m]':>11}" for k in self.kinds)
        lines = [f"step {self.step}, c(t) = {self.target:+.2f}; effective parameters {self.effective_params:,} of "
                 f"{self.dense_params:,} ({self.effective_params / self.dense_params:.3f}x)", head]
        n = len(next(iter(self.survival.values())))
        for i in range(n):
            lines.append(f"{'layers.' + str(i):<10}" + "".join(
                f"{self.survival[k][i]:>12.3f}{self.expected[k][i]:>11.3f}" for k in self.kinds))
        return "\n".join(lines)


@torch.no_grad()
def survival_report(model: nn.Module) -> SurvivalReport:
    from nemo_layerfx.models import count_params
    from nemo_layerfx.pruning.prune import effective_params

    enc = gated_encoder(model)
    schedule = enc.adaptive_dropout_schedule
    per_layer = gates_of(model)
    kinds = list(per_layer[0])
    survival = {k: [float((g[k].beta() >= schedule.config.c_inf).float().mean()) for g in per_layer] for k in kinds}
    expected = {k: [float(g[k].expected_retention().mean()) for g in per_layer] for k in kinds}
    # the gates' own logits are the only parameters the dense model lacks (counted here, not on a copy: a model
    # wrapped for DDP cannot be deep-copied, and the end of fit is where the callback asks)
    gate_params = sum(g.beta_prime.numel() for layer in per_layer for g in layer.values())
    return SurvivalReport(kinds, survival, expected, effective_params(model), count_params(model) - gate_params,
                          max(0, int(schedule.step)), schedule.target())


def plot_survival(report: SurvivalReport, path: str | Path) -> None:
    """PNG heatmap: layers x gated kinds, the share of surviving units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([report.survival[k] for k in report.kinds]).T  # (layers, kinds)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(report.kinds), 1.2 + 0.32 * data.shape[0]))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(report.kinds)), report.kinds)
    ax.set_yticks(range(data.shape[0]), [f"layers.{i}" for i in range(data.shape[0])])
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.5 else "black")
    ax.set_title(f"surviving units (step {report.step}); {report.effective_params / report.dense_params:.2f}x "
                 f"parameters", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_probe_report(report: SurvivalReport | dict) -> dict:
    """A block-level, probe-shaped report whose ``survival`` 'WER change' is a layer's mean surviving share (the
    lower, the more prunable: ranked as the more ambient by ``DropoutPlan.targeted(..., mode="survival")``)."""
    r = asdict(report) if isinstance(report, SurvivalReport) else dict(report)
    n = len(next(iter(r["survival"].values())))
    mean = [sum(r["survival"][k][i] for k in r["kinds"]) / len(r["kinds"]) for i in range(n)]
    return {"units": [f"layers.{i}" for i in range(n)], "delta_wer": {"survival": mean}, "baseline_wer": None,
            "source": "adaptive-dropout survival report"}
