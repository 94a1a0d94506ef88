"""How much rank a trained model uses, and rank maps derived from evidence rather than depth.

``energy_profile`` is the measurement behind Fernandez-Lopez et al.'s Figs. 1 and 3: for every linear of every
block, the fraction of singular values needed to hold 95 % of the weight's energy (Σσ²). They found it grows
almost linearly with depth, which motivates the ramp. ``alphas_from_report`` (beyond the paper) assigns the same
α values a ramp would use, but in the order of a layer-importance probe (most ambient block -> smallest α).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nemo_layerfx.encoder import layer_sets
from nemo_layerfx.lowrank.config import GROUPS, block_alphas
from nemo_layerfx.lowrank.linear import LowRankLinear
from nemo_layerfx.models import conformer_encoder
from nemo_layerfx.units import find_module, linears


def energy_rank(weight: torch.Tensor, energy: float = 0.95) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of Σσ² (weight reshaped to 2-D)."""
    s = torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).double())
    cum = torch.cumsum(s.square(), 0) / s.square().sum()
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1


def energy_profile(model: nn.Module, energy: float = 0.95) -> dict[str, list[float]]:
    """Per group (att, ffn, conv), per block: the mean over its linears of energy_rank / min(m, n).

    Low-rank linears are measured through their product U Vᵀ. Returns ``{group: [fraction per block]}``.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    out: dict[str, list[float]] = {g: [] for g in GROUPS}
    for layer in layer_sets(conformer_encoder(model)):
        for group in GROUPS:
            fractions = []
            for path in linears(group):
                module = find_module(layer, path)
                if module is None:
                    continue
                w = module.U @ module.Vt if isinstance(module, LowRankLinear) else module.weight
                w = w.reshape(w.shape[0], -1)
                fractions.append(energy_rank(w, energy) / min(w.shape))
            out[group].append(sum(fractions) / len(fractions))
    return out


def alphas_from_report(report: Any, low: float, high: float, mode: str = "rerand") -> list[float]:
    """Per-block α: the values of the linear ramp [low, high], handed out in the order of a block-level probe
    report's WER change (the most ambient block gets ``low``, the most critical the ramp's largest value).

    The multiset of α values equals the ramp's, so a model built with ``{alphas: ...}`` has exactly the size of
    the ramp model: only the order differs (by measured importance instead of depth).
    """
    from nemo_layerfx.models import block_layers, read_report

    r = read_report(report)
    block_layers(r, "alphas_from_report")
    if mode not in r.get("delta_wer", {}):
        raise ValueError(f"the report has no {mode!r} results (it has {sorted(r.get('delta_wer', {}))})")
    delta = r["delta_wer"][mode]
    ramp = block_alphas([low, high], len(delta))
    order = sorted(range(len(delta)), key=lambda k: (delta[k], k))  # most ambient first
    alphas = [0.0] * len(delta)
    for value, block in zip(ramp, order):
        alphas[block] = value
    return alphas
