"""Weights that CPU inference derives from parameters (fused attention projections, heads and FFN hidden layers
zero-padded to aligned widths), built on the first inference call and kept until a parameter changes.

A parameter can change without any sign on the tensor: torch's fused optimizers (``AdamW(fused=True)``, which our
configs ship) update it in place without bumping its version. So besides each parameter's storage, version and
device, the key holds a count of optimizer steps, taken by a hook on every ``torch.optim`` optimizer in the
process: whatever ran between two inference calls, a step invalidates what was kept.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_OPTIMIZER_STEPS = [0]


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def inference_cache(module: nn.Module, build: Callable[[], Any]) -> Any:
    """``build()``, computed once and kept on ``module`` until one of its parameters changes (storage, version or
    device) or any optimizer steps (module doc). While ``torch.jit.trace`` runs (NeMo's TorchScript export)
    nothing is kept: the traced graph derives the weights from the parameters."""
    if torch.jit.is_tracing():
        return build()
    key = (_OPTIMIZER_STEPS[0], tuple((p.data_ptr(), p._version, p.device) for p in module.parameters()))
    kept = module.__dict__.get("_inference_cache")
    if kept is not None and kept[0] == key:
        return kept[1]
    value = build()
    module.__dict__["_inference_cache"] = (key, value)
    return value


def drop_inference_cache(module: nn.Module) -> None:
    """Forget what ``inference_cache`` kept on ``module``."""
    module.__dict__.pop("_inference_cache", None)


class KeptInferenceWeights:
    """Mixin for a module that keeps inference weights: they are dropped when it switches to training (or back),
    so a training run does not hold a second copy of them."""

    def train(self, mode: bool = True):
        drop_inference_cache(self)
        return super().train(mode)
