"""The training side of adaptive dropout: the step for c(t), the regularizer, and the survival report.

``AdaptiveDropout`` (list it under ``trainer.callbacks``; it subclasses NeMo's ``Serialization`` so NeMo's
allow-list accepts it):

- hands the optimizer step to the gates before every batch (c(t) needs it; the step is saved with the model);
- puts the gates' β′ in their own optimizer group: ``weight_decay`` mode gives that group a coupled L2 of 2γ
  (gradient 2γβ′ = ∇R), ``loss`` mode gives it no decay and adds ∇R = 2γβ′ to β′'s gradient before every optimizer
  step (once per step, also under gradient accumulation, before clipping): R(β; t) = α Σ (β − c(t))² either way,
  whatever the optimizer does with its own weight decay; once the gates have settled (``settle_after_k``) β′ gets
  neither gradient nor R, so the optimizer leaves it (and its decay) alone;
- logs the expected retention, the surviving share and R every ``every_n_steps``, and at the end of fit writes
  ``survival.json`` / ``survival.png`` and logs them to the Lightning loggers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from nemo.core.classes.common import Serialization

from nemo_layerfx.models import conformer_encoder
from nemo_layerfx.pruning.apply import gated_encoder, gates_of


def regularizer(model) -> torch.Tensor:
    """R(β; t) = α Σ_d (β_d − c(t))² over every gate (the paper's moving-target L2)."""
    enc = gated_encoder(model)
    cfg, c = enc.adaptive_dropout_schedule.config, enc.adaptive_dropout_schedule.target()
    return cfg.alpha * sum(((g.beta() - c) ** 2).sum() for layer in gates_of(model) for g in layer.values())


class AdaptiveDropout(pl.Callback, Serialization):
    """See the module docstring. ``out_dir`` defaults to the trainer's log folder."""

    def __init__(self, every_n_steps: int = 50, out_dir: str | None = None):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.out_dir = every_n_steps, out_dir
        self.mode: str | None = None
        self.history: list[dict] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        enc = gated_encoder(pl_module)
        cfg = enc.adaptive_dropout_schedule.config
        if cfg.settle_after_k:
            from nemo_layerfx.distributed import allow_unused_parameters

            allow_unused_parameters(trainer, f"the gates settle after K = {cfg.steps} steps and get no gradient")
        optim = (pl_module.cfg.get("optim") or {}) if hasattr(pl_module, "cfg") else {}
        self.mode = cfg.mode(optim.get("name"))
        if self.mode == "weight_decay" and str(optim.get("name", "")).lower() == "adamw":
            raise ValueError("adaptive_dropout.regularizer=weight_decay needs an optimizer with coupled L2 (sgd, "
                             "adam, ...); AdamW decays decoupled: use regularizer: loss (or auto)")
        gate_ids = {id(g.beta_prime) for layer in gates_of(pl_module) for g in layer.values()}
        decay = 2.0 * cfg.gamma if self.mode == "weight_decay" else 0.0
        original = pl_module.setup_optimizer_param_groups

        def with_gate_group() -> None:  # NeMo builds the optimizer from these groups
            original()
            groups = []
            for group in pl_module._optimizer_param_groups or [{"params": list(pl_module.parameters())}]:
                params = list(group["params"])
                rest = [p for p in params if id(p) not in gate_ids]
                gates = [p for p in params if id(p) in gate_ids]
                if rest:
                    groups.append({**group, "params": rest})
                if gates:
                    groups.append({**group, "params": gates, "weight_decay": decay})
            pl_module._optimizer_param_groups = groups

        pl_module.setup_optimizer_param_groups = with_gate_group

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        conformer_encoder(pl_module).adaptive_dropout_schedule.step.fill_(int(trainer.global_step))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        schedule = gated_encoder(pl_module).adaptive_dropout_schedule
        if self.mode != "loss" or schedule.settled():
            return
        gamma = schedule.config.gamma
        with torch.no_grad():
            for layer in gates_of(pl_module):
                for gate in layer.values():
                    grad = 2.0 * gamma * gate.beta_prime  # ∇_β′ R = 2α(β − c)·√(γ/α) = 2γβ′
                    if gate.beta_prime.grad is None:
                        gate.beta_prime.grad = grad.clone()
                    else:
                        gate.beta_prime.grad.add_(grad)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        enc = gated_encoder(pl_module)
        c_inf = enc.adaptive_dropout_schedule.config.c_inf
        metrics: dict[str, float] = {"adaptive_dropout/target": enc.adaptive_dropout_schedule.target()}
        with torch.no_grad():
            per_layer = gates_of(pl_module)
            for kind in per_layer[0]:
                betas = torch.cat([layer[kind].beta() for layer in per_layer])
                metrics[f"adaptive_dropout/{kind}/expected_retention"] = float(torch.sigmoid(betas).mean())
                metrics[f"adaptive_dropout/{kind}/surviving"] = float((betas >= c_inf).float().mean())
            metrics["adaptive_dropout/regularizer"] = float(regularizer(pl_module))
        self.history.append({"step": int(trainer.global_step), **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(trainer.global_step))
        return metrics

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from nemo_layerfx.pruning.report import plot_survival, survival_report

        self._log(trainer, pl_module)
        # every rank asks: under DDP trainer.log_dir is a broadcast, which rank 0 alone would wait on forever
        out = Path(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "adaptive_dropout")
        if not trainer.is_global_zero:
            return
        report = survival_report(pl_module)
        report.to_json(out / "survival.json")
        plot_survival(report, out / "survival.png")
        for logger in trainer.loggers:
            logger.log_metrics({f"adaptive_dropout/survival/{k}/layers.{i}": v for k, vals in report.survival.items()
                                for i, v in enumerate(vals)}, step=int(trainer.global_step))
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                import matplotlib.image as mpimg

                logger.experiment.add_image("adaptive_dropout/survival", mpimg.imread(out / "survival.png")[..., :3],
                                            int(trainer.global_step), dataformats="HWC")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
