"""The layer-importance callback: snapshot at fit start, probe during and after training, log and plot.

NeMo 3.0 instantiates ``trainer.callbacks`` entries through its allow-list, which accepts a plugin callback only if
it also subclasses NeMo's ``Serialization``. Listed in configs as ``nemo_layerfx.callbacks.LayerImportanceCallback``
(that path re-exports this class).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from nemo.core.classes.common import Serialization

from nemo_layerfx.importance.plot import plot_history


class LayerImportanceCallback(pl.Callback, Serialization):
    """Snapshots the encoder layers at fit start and probes layer importance during and after training.

    Listed under ``trainer.callbacks`` in a config::

        - _target_: nemo_layerfx.callbacks.LayerImportanceCallback
          every_n_epochs: 5          # and/or at_steps: [1000, 5000]; at_fit_end: true
          modes: [reinit, rerand]
          draws: 1
          max_utterances: 200        # a capped subset of the validation manifest keeps probes cheap
          batch_variants: 8          # on a GPU: 8 resets of a layer per batched pass (see ProbeConfig)

    The step-0 values go to ``<out_dir>/init_layers.safetensors`` (a resumed run reuses them). Each probe point
    writes ``probe_step<k>.json``, logs per-unit WER changes and churn to the Lightning loggers, and redraws the
    ``importance.png`` heatmap (units x probe points). Probing runs in eval mode with forked RNG streams and
    restores every weight, so training continues exactly as it would have without the callback.
    """

    def __init__(self, manifest: str | None = None, out_dir: str | None = None, every_n_epochs: int | None = None,
                 at_steps: list[int] | None = None, at_fit_end: bool = True, modes: list[str] | None = None,
                 unit: str = "block", draws: int = 1, seed: int = 0, max_utterances: int | None = None,
                 batch_size: int = 16, ambient_rel_threshold: float = 0.10, n_ambient: int | None = None,
                 batch_variants: int = 1, rule: str = "relative", bootstrap: int = 1000):
        super().__init__()
        from nemo_layerfx.importance.config import ProbeConfig

        self.config = ProbeConfig(modes=tuple(modes or ("reinit", "rerand")), unit=unit, draws=draws, seed=seed,
                                  max_utterances=max_utterances, batch_size=batch_size,
                                  ambient_rel_threshold=ambient_rel_threshold, n_ambient=n_ambient,
                                  batch_variants=batch_variants, rule=rule, bootstrap=bootstrap)
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.manifest, self.out_dir = manifest, out_dir
        self.every_n_epochs, self.at_steps, self.at_fit_end = every_n_epochs, set(at_steps or []), at_fit_end
        self.snapshot: dict | None = None
        self.history: list[dict] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modes=self.config.modes, unit=self.config.unit)

    def _paths(self, trainer: pl.Trainer) -> Path:
        out = Path(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "layer_importance")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from nemo_layerfx.importance.resets import probed_encoder

        probed_encoder(pl_module)  # fail fast: no Conformer encoder, or one with shared layers
        if self.manifest is None:
            from nemo_layerfx.train import manifest_paths

            paths = manifest_paths((pl_module.cfg.get("validation_ds") or {}).get("manifest_filepath"))
            if not paths:
                raise ValueError("LayerImportanceCallback needs manifest= or model.validation_ds.manifest_filepath")
            self.manifest = paths[0]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from nemo_layerfx.importance.resets import check_snapshot, layer_snapshot, load_snapshot, save_snapshot

        path = self._paths(trainer) / "init_layers.safetensors"
        if path.is_file():  # resumed run: the step-0 values were saved by the first start
            self.snapshot = load_snapshot(path)
            check_snapshot(pl_module, self.snapshot)
        else:
            self.snapshot = layer_snapshot(pl_module)
            if trainer.is_global_zero:
                save_snapshot(self.snapshot, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.at_steps:
            self.at_steps.discard(trainer.global_step)  # gradient accumulation repeats a step number
            self._probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._probe(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and not any(h["step"] == trainer.global_step for h in self.history):
            self._probe(trainer, pl_module)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        from nemo_layerfx.importance.probe import probe

        # under DDP every rank probes its share of the utterances and gets the whole report (one gather at the
        # end, so unequal shares cannot hang); rank 0 writes and logs it
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            report = probe(pl_module, self.manifest, self.config, init=self.snapshot,
                           distributed=trainer.world_size > 1)
        step, out = trainer.global_step, self._paths(trainer)
        entry = {"step": step, "epoch": trainer.current_epoch, "baseline_wer": report.baseline_wer,
                 "units": report.units, "delta_wer": report.delta_wer, "ambient": report.ambient,
                 "churn": report.churn}
        self.history.append(entry)
        if not trainer.is_global_zero:
            return
        report.to_json(out / f"probe_step{step}.json")
        metrics = {"importance/baseline_wer": report.baseline_wer}
        for mode, deltas in report.delta_wer.items():
            metrics.update({f"importance/{mode}/dwer/{u}": d for u, d in zip(report.units, deltas)})
        for kind, values in (report.churn or {}).items():
            metrics.update({f"importance/churn/{kind}/layers.{i}": v for i, v in enumerate(values)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        fig_path = out / "importance.png"
        plot_history(self.history, fig_path)
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                import matplotlib.image as mpimg

                logger.experiment.add_image("importance/heatmap", mpimg.imread(fig_path)[..., :3], step,
                                            dataformats="HWC")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "at_steps": sorted(self.at_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.at_steps = set(state_dict.get("at_steps", self.at_steps))
