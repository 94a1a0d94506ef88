"""Sampled depth in training (Tian et al. 2021): each optimizer step runs the first N ~ U{L..H} layers only.

The draw is a pure function of (seed, optimizer step), so every micro-batch of a step (gradient accumulation) and
every DDP rank get the same N without any communication, and a rerun with the same seed draws the same sequence.
The encoder cannot see the trainer's step, so ``DepthSampling`` (a Lightning callback, listed under
``trainer.callbacks``) hands it over before each batch and logs the draw as ``train_depth``.

With unshared layers the layers above N get no gradient in that step: under DDP, ``DepthSampling`` tells the
strategy to look for them (``nemo_layerfx.distributed``), so no strategy override is needed. With
``share_layers: 1`` every parameter is used every step and DDP runs as usual.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from nemo.core.classes.common import Serialization
from torch import nn

from nemo_layerfx.encoder import EncoderExtension
from nemo_layerfx.options import EncoderOption
from nemo_layerfx.models import conformer_encoder


@dataclass
class DepthSampler(EncoderExtension):
    """The ``depth_sampling`` section of the encoder config.

    low, high: L and H of U{L..H}, inclusive (Tian: U(2, 8) on an 8-layer model). seed: the draw of step t is a
    function of (seed, t) only.
    """

    low: int
    high: int
    seed: int = 0
    step: int | None = None  # the optimizer step the next training forward belongs to (set by DepthSampling)

    def check(self, n_layers: int) -> None:
        if not 1 <= self.low <= self.high <= n_layers:
            raise ValueError(f"depth_sampling {{low: {self.low}, high: {self.high}}} needs 1 <= low <= high <= "
                             f"n_layers={n_layers} (e.g. {{low: 2, high: {n_layers}}})")

    def draw(self, step: int) -> int:
        """N for optimizer step ``step``."""
        return random.Random(self.seed * 1_000_003 + int(step)).randint(self.low, self.high)

    def depth(self) -> int:
        if self.step is None:
            raise RuntimeError(
                "the encoder has depth_sampling but no optimizer step was handed to it: add "
                "{_target_: nemo_layerfx.depth.DepthSampling} to trainer.callbacks (the shipped "
                "conformer_gn_shared configs do), or set encoder.extension('depth_sampling').step = <step> in your "
                "own loop")
        return self.draw(self.step)

    def training_depth(self, encoder: nn.Module) -> int:
        return self.depth()


def depth_sampler(encoder: nn.Module) -> DepthSampler | None:
    """The encoder's depth sampler (its ``depth_sampling`` extension), or None (also for NeMo's own encoder)."""
    find = getattr(encoder, "extension", None)
    return find("depth_sampling") if find is not None else None


def skips_parameters(encoder: nn.Module, sampler: DepthSampler) -> bool:
    """Whether a step at the lowest depth leaves a parameter set unused (unshared layers, or G > 1 shared sets)."""
    n, groups = len(encoder.layers), getattr(encoder, "share_layers", None) or len(encoder.layers)
    return (sampler.low - 1) * groups // n < groups - 1  # the set of layer low-1 is not the last set


def apply_option(encoder: nn.Module, value: Any) -> None:
    """The ``depth_sampling`` encoder option: attach a ``DepthSampler`` (checked against the encoder)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict) or not {"low", "high"} <= set(value) or set(value) - {"low", "high", "seed"}:
        raise ValueError(f"depth_sampling must be {{low: L, high: H}} (optionally seed), got {value!r}")
    sampler = DepthSampler(int(value["low"]), int(value["high"]), int(value.get("seed", 0)))
    sampler.check(len(encoder.layers))
    if getattr(encoder, "att_context_style", "regular") != "regular" or len(getattr(encoder, "att_context_size_all",
                                                                                    [[-1, -1]])) > 1:
        raise ValueError("depth_sampling cannot be combined with cache-aware streaming (att_context_style / "
                         "multiple att_context_size): a streaming cache holds one entry per layer for every chunk; "
                         "train the offline model with depth sampling instead")
    encoder.add_extension("depth_sampling", sampler)


OPTION = EncoderOption("depth_sampling", apply_option, order=30, training_only=True)  # an entry point


class DepthSampling(pl.Callback, Serialization):
    """Hands the optimizer step to the encoder's depth sampler before every training batch and logs the draw.

    Listed in a config as ``{_target_: nemo_layerfx.depth.DepthSampling}``. ``history`` keeps (step, depth) of
    every training batch (plain data, restored with the trainer's checkpoint).
    """

    def __init__(self, log: bool = True):
        super().__init__()
        self.log = log
        self.history: list[tuple[int, int]] = []
        self.rank_histories: list[list[tuple[int, int]]] = []  # every rank's history, after training

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        enc = conformer_encoder(pl_module)
        sampler = depth_sampler(enc)
        if sampler is None:
            raise ValueError("DepthSampling is in trainer.callbacks but the encoder has no depth_sampling: set "
                             "model.encoder.depth_sampling: {low: L, high: H}, or remove the callback")
        if skips_parameters(enc, sampler):
            from nemo_layerfx.distributed import allow_unused_parameters

            allow_unused_parameters(trainer, f"sampled depth {sampler.low}..{sampler.high} skips the parameters of "
                                             "the layers above it")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        sampler = depth_sampler(conformer_encoder(pl_module))
        sampler.step = int(trainer.global_step)
        depth = sampler.depth()
        self.history.append((sampler.step, depth))
        if self.log:
            pl_module.log("train_depth", float(depth), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under DDP, every rank's (step, depth) sequence, gathered once (``rank_histories``): they must agree, as
        the draw is a function of (seed, step) alone; a rank that drew otherwise trained another network."""
        from nemo_layerfx.distributed import gather_objects

        self.rank_histories = gather_objects([tuple(h) for h in self.history])
        if any(h != self.rank_histories[0] for h in self.rank_histories[1:]):
            raise RuntimeError("DDP ranks drew different depths: "
                               + "; ".join(f"rank {r}: {h[:5]}..." for r, h in enumerate(self.rank_histories))
                               + " (is depth_sampling.seed the same on every rank?)")

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]
