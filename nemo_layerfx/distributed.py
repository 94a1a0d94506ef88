"""What the plugin does for multi-process (DDP) training, in one place: capabilities call these from their
callbacks' ``setup``, which Lightning runs before it wraps the model in ``DistributedDataParallel``.

A capability that leaves some parameters without a gradient in a step (unshared layers above the sampled depth;
adaptive-dropout gates after they settle) would make DDP fail at the next step ("Expected to have finished
reduction in the prior iteration"). ``allow_unused_parameters`` turns on DDP's search for them, so users never
have to choose ``ddp_find_unused_parameters_true`` themselves.
"""

from __future__ import annotations

from typing import Any


def ddp_strategy(trainer: Any) -> Any | None:
    """The trainer's DDP strategy (any launcher: popen, spawn, fork, notebook), or None for a single process."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = getattr(trainer, "strategy", None)
    return strategy if isinstance(strategy, DDPStrategy) else None


def allow_unused_parameters(trainer: Any, why: str) -> bool:
    """Make DDP look for parameters without a gradient (``find_unused_parameters=True``) when the trainer runs DDP;
    returns whether it changed anything. Must run before the strategy wraps the model (a callback's ``setup``)."""
    strategy = ddp_strategy(trainer)
    if strategy is None or strategy._ddp_kwargs.get("find_unused_parameters"):
        return False
    if getattr(strategy, "model", None) is not None and type(strategy.model).__name__ == "DistributedDataParallel":
        raise RuntimeError(f"{why}: DDP must look for unused parameters, but the model is already wrapped; use "
                           "trainer.strategy=ddp_find_unused_parameters_true")
    strategy._ddp_kwargs["find_unused_parameters"] = True  # Lightning has no public setter; read when it wraps
    if getattr(trainer, "is_global_zero", True):
        from nemo.utils import logging

        logging.info(f"[layerfx] DDP will look for parameters without a gradient ({why})")
    return True
