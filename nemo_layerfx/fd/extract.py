"""Federated-dropout submodels: a plan's units carved out of a model as a dense, smaller model of the same class."""

from __future__ import annotations

from omegaconf import open_dict
from torch import nn

from nemo_layerfx.fd.plan import DropoutPlan, choose_units
from nemo_layerfx.surgery import Units, build_submodel, units_param_count, units_to_lists


def extract(model: nn.Module, plan: DropoutPlan, seed: int = 0, units: Units | None = None):
    """A new, dense, smaller model of ``model``'s class with the plan's units kept, and its unit map.

    The submodel shares nothing with ``model`` (its own tensors), has the same class, preprocessor, decoder and
    d_model, an encoder config that states its per-layer widths (so ``save_to`` / ``restore_from`` rebuild it),
    and ``cfg.fd_submodel`` recording the plan and the kept units. ``model`` is not modified.

    Composes with parameter-free encoder changes only: a factorized (low-rank) encoder is refused with a clear
    error (units are slices of dense weights; merge it first).

    Example::

        sub, units = extract(model, DropoutPlan.flat(16, 0.5, kinds=("ffn", "head", "conv")), seed=3)
        sub.save_to("client.nemo")
    """
    units = units if units is not None else choose_units(model, plan, seed)
    sub = build_submodel(model, units)
    with open_dict(sub._cfg):
        sub._cfg.fd_submodel = {"plan": plan.to_dict(), "seed": int(seed), "units": units_to_lists(units)}
    return sub, units


def plan_param_count(model: nn.Module, plan_or_units: DropoutPlan | Units) -> int:
    """The submodel's parameter count from arithmetic alone: the model's, minus each dropped unit's slices."""
    if isinstance(plan_or_units, DropoutPlan):
        return units_param_count(model, lambda i, kind, n: plan_or_units.keep(kind, i, n))
    return units_param_count(model, lambda i, kind, n: len(plan_or_units[i][kind]))
