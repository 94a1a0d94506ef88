"""Physically prune a gated model: remove every unit whose β < c∞ and build the dense, smaller model.

The smaller model is built the way federated dropout builds a submodel (``nemo_layerfx.surgery``): same NeMo class,
encoder config stating its per-layer widths (FFN hidden sizes, per-head query/key and value widths, conv groups),
weights copied. No fine-tuning is needed: its outputs equal the gated model's in eval mode (deterministic masks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch import nn

from nemo_layerfx.models import check_output, count_params, restore, save_nemo
from nemo_layerfx.pruning.apply import gated_encoder, kept_units, remove_gates
from nemo_layerfx.surgery import build_submodel, units_param_count
from nemo_layerfx.units import PRUNE_KINDS, n_units


@dataclass
class PruneReport:
    """What ``prune`` removed: per layer and unit kind (kept, total); parameter counts; min_units notes."""

    kept: list[dict[str, list[int]]]
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"parameters: {self.params_before:,} -> {self.params_after:,} "
               f"({self.params_after / self.params_before:.3f}x)"]
        for i, row in enumerate(self.kept):
            out.append(f"layers.{i}: " + "  ".join(f"{k} {kept}/{total}" for k, (kept, total) in row.items()))
        return out + [f"note: {n}" for n in self.notes]


def effective_params(model: nn.Module) -> int:
    """The parameter count of the model ``prune`` would build, from the unit map's arithmetic (no model built)."""
    units, _ = kept_units(model)
    plain = remove_gates(model)
    return units_param_count(plain, lambda i, kind, n: len(units[i][kind]), PRUNE_KINDS)


def schedule_notes(schedule: nn.Module) -> list[str]:
    """What a user must know before trusting a prune: whether training brought c(t) down to c∞ (K steps).

    Before that, the gates were still being pushed shut, and β ≥ c∞ keeps units the rest of the schedule would
    have closed (a one-epoch run of the tiny preset keeps every unit); the prune is still exact, just early."""
    cfg, step = schedule.config, int(schedule.step)
    if step >= cfg.steps:
        return []
    step = max(step, 0)
    return [f"the gates' schedule is at step {step} of K = {cfg.steps} (c(t) = {cfg.target(step):+.2f}, "
            f"not yet c_inf = {cfg.c_inf:+g}): training stopped before the threshold came down, so units it would "
            "still have closed are kept; train for at least adaptive_dropout.steps optimizer steps before pruning"]


def prune(model: nn.Module) -> tuple[nn.Module, PruneReport]:
    """A new, dense, smaller model of ``model``'s class without the units whose β < c∞; ``model`` is unchanged.

    Example::

        small, report = prune(gated_model)
        print("\\n".join(report.lines()))
        small.save_to("pruned.nemo")
    """
    enc = gated_encoder(model)
    units, notes = kept_units(model)
    notes = schedule_notes(enc.adaptive_dropout_schedule) + notes
    plain = remove_gates(model)
    small = build_submodel(plain, units)
    kept = [{k: [len(units[i][k]), n_units(layer, k)] for k in PRUNE_KINDS} for i, layer in enumerate(enc.layers)]
    return small, PruneReport(kept, count_params(plain), count_params(small), notes)


def prune_file(src: str | os.PathLike, dst: str | os.PathLike) -> PruneReport:
    """``prune`` from one ``.nemo`` to another (written atomically; ``src`` is never modified)."""
    check_output(src, dst)
    small, report = prune(restore(src))
    save_nemo(small, dst)
    return report
