"""Lightning callbacks that NeMo can instantiate from ``trainer.callbacks`` in a config.

NeMo 3.0 instantiates ``trainer.callbacks`` entries through its allow-list, which accepts a plugin callback only
if it also subclasses NeMo's ``Serialization``; so every callback here does.

    trainer:
      callbacks:
        - _target_: nemo_layerfx.callbacks.LossHistory
          path: runs/loss_history.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from nemo.core.classes.common import Serialization


class LossHistory(pl.Callback, Serialization):
    """Records the training loss of every optimizer step; writes ``path`` (JSON) at the end of fit."""

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.steps.append(int(trainer.global_step))
            self.losses.append(float(loss))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.path and trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps({"step": self.steps, "loss": self.losses}) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "losses": self.losses}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.losses = list(state_dict.get("losses", []))


from nemo_layerfx.importance.callback import LayerImportanceCallback  # noqa: E402,F401  (its documented config target path)
