"""Weights that CPU inference derives from parameters (fused attention projections, heads and FFN hidden layers
zero-padded to aligned widths), built on the first inference call and kept until a parameter changes.

A parameter can change without any sign on the tensor: torch's fused optimizers (``AdamW(fused=True)``, which our
configs ship) update it in place without bumping its version. So besides each parameter's storage, version and
device, the key holds a count of optimizer steps, taken by a hook on every ``torch.optim`` optimizer in the
process: whatever ran between two inference calls, a step invalidates what was kept. A parameter or submodule
assigned anywhere (a rewrite that swaps a layer, ``load_state_dict(assign=True)``) is counted by torch's global
registration hooks, so the key need not walk the module tree on every call. The hooks are installed when the first
value is kept (what happened before cannot make a later value stale), so a process that imports the package but
never runs our CPU inference path carries none: it reads the parameter slots found
when the weights were built (a pruned 16-layer encoder looks its kept weights up 48 times per forward: 0.67 ms
walking ``module.parameters()``, 0.22 ms reading the slots, timed ad hoc).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

_EVENTS = [0]  # optimizer steps, parameter and submodule registrations, anywhere in the process, once watched
_HOOKS: list = []  # their handles, from the first kept value on


def _count(*args: Any) -> None:
    _EVENTS[0] += 1


def _watch() -> None:
    """Count the events that can make a kept value stale, from now on (once per process)."""
    if not _HOOKS:
        _HOOKS.extend([register_optimizer_step_post_hook(_count), register_module_parameter_registration_hook(_count),
                       register_module_module_registration_hook(_count)])


def watching() -> bool:
    """Whether the process-wide hooks are installed (a value has been kept)."""
    return bool(_HOOKS)


class _Kept(NamedTuple):
    events: int  # _EVENTS when the value was built
    slots: list[tuple[dict, str]]  # (a module's ``_parameters``, name) of every parameter the value derives from
    state: tuple  # ``_state(slots)`` when the value was built
    value: Any


def inference_cache(module: nn.Module, build: Callable[[], Any]) -> Any:
    """``build()``, computed once and kept on ``module`` until one of its parameters changes (storage, version or
    device) or any optimizer steps (module doc). While ``torch.jit.trace`` runs (NeMo's TorchScript export)
    nothing is kept: the traced graph derives the weights from the parameters."""
    if torch.jit.is_tracing():
        return build()
    kept = module.__dict__.get("_inference_cache")
    if kept is not None and kept.events == _EVENTS[0] and kept.state == _state(kept.slots):
        return kept.value
    _watch()
    slots = [(m._parameters, name) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    value = build()
    module.__dict__["_inference_cache"] = _Kept(_EVENTS[0], slots, _state(slots), value)
    return value


def _state(slots: list[tuple[dict, str]]) -> tuple:
    """What identifies the parameters' current values: each slot's tensor, its storage, version and device (the
    slot is read again, so a parameter put straight into ``_parameters`` (``Module._apply``), set to None or
    deleted, none of which fires a registration hook, is seen too)."""
    return tuple(None if p is None else (id(p), p.data_ptr(), p._version, p.device)
                 for p in (d.get(n) for d, n in slots))


def drop_inference_cache(module: nn.Module) -> None:
    """Forget what ``inference_cache`` kept on ``module``."""
    module.__dict__.pop("_inference_cache", None)


class KeptInferenceWeights:
    """Mixin for a module that keeps inference weights: they are dropped when it switches to training (or back),
    so a training run does not hold a second copy of them."""

    def train(self, mode: bool = True):
        drop_inference_cache(self)
        return super().train(mode)
