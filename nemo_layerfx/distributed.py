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


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank: one collective call, whatever each rank's
    share held (an empty shard included), so ranks with unequal shards cannot hang on each other."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def shard(items: list, rank: int, size: int) -> list:
    """Rank ``rank``'s share of ``items``: every ``size``-th item from ``rank`` on (``interleave`` undoes it)."""
    return items[rank::size]


def interleave(shards: list[list]) -> list:
    """The list ``shard`` split: item i comes from shard i % size, position i // size."""
    size, total = len(shards), sum(len(s) for s in shards)
    return [shards[i % size][i // size] for i in range(total)]
