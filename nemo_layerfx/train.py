"""Training entry point: NeMo's example-script body, with the model class picked from the config.

    python -m nemo_layerfx.train --config-name conformer_gn_tiny            # or examples/asr/speech_to_text.py
    python -m nemo_layerfx.train --config-path /my/conf --config-name my_cfg trainer.max_epochs=5

Lightning callbacks listed under ``trainer.callbacks`` (``_target_`` each) are instantiated by NeMo's
``resolve_trainer_cfg``; a plugin callback must also subclass NeMo's ``Serialization`` to pass the allow-list.
An optional ``layerfx:`` section adds: ``model_class`` (override the inferred class), ``seed``, ``report_wer`` (dev
WER before and after fit), ``report_path`` (write that report as JSON), ``save_to`` (final ``.nemo``) and
``verbose`` (the console shows NeMo's info logs; by default only warnings, errors, a progress bar and our lines,
while the experiment's log file keeps everything). The path of the trained ``.nemo`` is printed at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_layerfx.models import NO_DATA_WARNINGS
from nemo_layerfx.quiet import without_nemo_warnings
from nemo_layerfx.registration import register

CONF_DIR = str(Path(__file__).resolve().parent / "conf")

# name -> NeMo class path; the name can be given as layerfx.model_class
MODEL_CLASSES = {
    "ctc_bpe": "nemo.collections.asr.models.EncDecCTCModelBPE",
    "ctc": "nemo.collections.asr.models.EncDecCTCModel",
    "rnnt_bpe": "nemo.collections.asr.models.EncDecRNNTBPEModel",
    "rnnt": "nemo.collections.asr.models.EncDecRNNTModel",
    "hybrid_bpe": "nemo.collections.asr.models.EncDecHybridRNNTCTCBPEModel",
    "hybrid": "nemo.collections.asr.models.EncDecHybridRNNTCTCModel",
    "ssl": "nemo.collections.asr.models.SpeechEncDecSelfSupervisedModel",  # masked-reconstruction pretraining
}


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """A config from ``conf/`` composed by Hydra exactly as the entry point composes it (for notebooks, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides or []))


def model_class_name(cfg: DictConfig) -> str:
    """CTC / RNNT / hybrid from the decoder blocks present; BPE when a tokenizer is configured."""
    explicit = (cfg.get("layerfx") or {}).get("model_class")
    if explicit:
        if explicit not in MODEL_CLASSES:
            raise ValueError(f"unknown layerfx.model_class {explicit!r}; choose one of {', '.join(MODEL_CLASSES)}")
        return explicit
    m = cfg.model
    kind = "hybrid" if "joint" in m and "aux_ctc" in m else "rnnt" if "joint" in m else "ctc"
    return f"{kind}_bpe" if m.get("tokenizer") is not None else kind


def model_class(cfg: DictConfig) -> type:
    import importlib

    module, _, name = MODEL_CLASSES[model_class_name(cfg)].rpartition(".")
    return getattr(importlib.import_module(module), name)


def manifest_paths(value: Any) -> list[str]:
    """The manifest files of a ``manifest_filepath`` entry (a path, a comma-separated string or a list)."""
    if value is None:
        return []
    if isinstance(value, (list, ListConfig)):
        return [p for v in value for p in manifest_paths(v)]
    return [p for p in str(value).split(",") if p]


def check_inputs(cfg: DictConfig) -> None:
    """Fail before any model is built when a manifest or the tokenizer is missing or empty."""
    m = cfg.model
    for split in ("train_ds", "validation_ds", "test_ds"):
        ds = m.get(split)
        if ds is None or ds.get("is_tarred", False) or ds.get("use_lhotse", False):
            continue
        if split != "test_ds" and OmegaConf.is_missing(ds, "manifest_filepath"):
            raise ValueError(f"model.{split}.manifest_filepath is not set")
        for path in manifest_paths(ds.get("manifest_filepath")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"model.{split}.manifest_filepath: no such manifest: {path} (point it at a "
                                        f"NeMo manifest, or set corpus_dir= to a folder made by layerfx make-corpus)")
            if os.path.getsize(path) == 0:
                raise ValueError(f"model.{split}.manifest_filepath: manifest is empty: {path}")
    for name, init in (cfg.get("init_from_nemo_model") or {}).items():
        if OmegaConf.is_missing(init, "path"):
            raise ValueError(f"init_from_nemo_model.{name}.path is not set (the pretrained .nemo to start from)")
        if not os.path.isfile(str(init.path)):
            raise FileNotFoundError(f"init_from_nemo_model.{name}.path: no such .nemo file: {init.path}")
    tok = m.get("tokenizer")
    if tok is not None:
        if OmegaConf.is_missing(tok, "dir"):
            raise ValueError("model.tokenizer.dir is not set (a folder with tokenizer.model)")
        needed = "vocab.txt" if tok.get("type") == "wpe" else "tokenizer.model"
        if not os.path.isfile(os.path.join(str(tok.dir), needed)):
            raise FileNotFoundError(f"model.tokenizer.dir={tok.dir} has no {needed}")


def _metrics(results: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def train(cfg: DictConfig, extra_callbacks: list | None = None):
    """Build the trainer, exp_manager and model from ``cfg``, fit, and return the trained model.

    ``extra_callbacks`` are Lightning callbacks added to those of ``trainer.callbacks`` (Python callers only).
    """
    import lightning.pytorch as pl
    from nemo.utils import logging
    from nemo.utils.exp_manager import exp_manager
    from nemo.utils.trainer_utils import resolve_trainer_cfg

    register()
    check_inputs(cfg)
    cls = model_class(cfg)
    extra = cfg.get("layerfx") or {}
    if extra.get("seed") is not None:
        pl.seed_everything(int(extra.seed), workers=True)
    trainer_kwargs = resolve_trainer_cfg(cfg.trainer)
    if extra_callbacks:
        trainer_kwargs["callbacks"] = list(trainer_kwargs.get("callbacks") or []) + list(extra_callbacks)
    trainer = pl.Trainer(**trainer_kwargs)
    log_dir = exp_manager(trainer, cfg.get("exp_manager", None))
    if log_dir is not None:
        log_to_file(Path(log_dir) / f"nemo_log_globalrank-{trainer.global_rank}.txt")
    with without_nemo_warnings(*NO_DATA_WARNINGS[2:]):  # a config without a test set is not worth a warning
        model = cls(cfg=cfg.model, trainer=trainer)
    model.maybe_init_from_pretrained_checkpoint(cfg)

    report: dict[str, Any] = {"model_class": f"{cls.__module__}.{cls.__name__}"}
    if extra.get("report_wer"):
        report["start"] = _metrics(trainer.validate(model, verbose=False))
    trainer.fit(model)
    if extra.get("report_wer"):
        report["end"] = _metrics(trainer.validate(model, verbose=False))
        report["steps"] = int(trainer.global_step)
        start, end = report["start"].get("val_wer"), report["end"].get("val_wer")
        logging.info(f"dev WER: start {start:.4f} -> end {end:.4f} after {trainer.global_step} steps")
        if trainer.is_global_zero:  # under DDP every rank gets here with the same (reduced) numbers
            print(f"[layerfx] dev WER at start: {start:.4f}   dev WER at end: {end:.4f}   "
                  f"({trainer.global_step} steps)", flush=True)
        if extra.get("report_path"):
            Path(extra.report_path).parent.mkdir(parents=True, exist_ok=True)
    test = cfg.model.get("test_ds")
    if test is not None and test.get("manifest_filepath"):
        if model.prepare_test(trainer):
            trainer.test(model)
    if extra.get("save_to"):
        model.save_to(str(extra.save_to))
    nemo = str(Path(extra.save_to).resolve()) if extra.get("save_to") else saved_nemo(trainer)
    if nemo and trainer.is_global_zero:
        print(f"[layerfx] trained model: {nemo}", flush=True)
    if extra.get("report_wer") and extra.get("report_path") and trainer.is_global_zero:
        report["nemo"] = nemo
        Path(extra.report_path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return model


def saved_nemo(trainer) -> str | None:
    """The .nemo that NeMo's checkpoint callback wrote at the end of training, if it wrote one."""
    cb = getattr(trainer, "checkpoint_callback", None)
    if cb is None or not getattr(cb, "save_nemo_on_train_end", False) or not getattr(cb, "dirpath", None):
        return None
    path = Path(cb.dirpath) / f"{cb.prefix}{cb.postfix}"
    return str(path.resolve()) if path.is_file() else None


def log_to_file(path: Path) -> None:
    """NeMo's log records, info included, to ``path`` in the experiment folder (NeMo 3.0 writes only warnings
    there unless NEMO_TESTING is set); the console stays as quiet as ``quiet_console`` makes it. One file per
    process at a time: a second ``train`` in the same process moves the handler to its own experiment."""
    from nemo.utils import logging as nemo_logging

    old = nemo_logging._handlers.pop("file", None)
    if old is not None:
        nemo_logging._logger.removeHandler(old)
        old.close()
    nemo_logging.add_file_handler(path)


def user_error(exc: BaseException) -> str | None:
    """The message of a config or input error that nemo_layerfx itself raised (anywhere in the exception chain,
    e.g. inside Hydra's instantiation of our encoder), else None: a bug keeps its full traceback."""
    package = str(Path(__file__).resolve().parent)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ValueError, FileNotFoundError)) and exc.__traceback__ is not None:
            tb = exc.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            if str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(package):
                return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _main(cfg: DictConfig) -> None:
    from nemo_layerfx.quiet import quiet_console

    quiet_console(bool((cfg.get("layerfx") or {}).get("verbose", False)))
    try:
        train(cfg)
    except Exception as e:  # one line for a wrong config or a missing file; the full traceback for anything else
        message = user_error(e)
        if message is None:
            raise
        print(f"[layerfx] error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_config_name(argv: list[str]) -> str | None:
    """One line naming the shipped configs when ``--config-name`` names none of them (and no ``--config-path``
    points elsewhere); None when the name is fine. Hydra's own error is a 50-line traceback."""
    name, has_path = None, False
    for i, arg in enumerate(argv):
        for flag in ("--config-name", "-cn", "--config-path", "-cp"):
            if arg == flag or arg.startswith(flag + "="):
                value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
                if flag in ("--config-path", "-cp"):
                    has_path = True
                else:
                    name = value
    shipped = sorted(p.stem for p in Path(CONF_DIR).glob("*.yaml"))
    if name is None or has_path or Path(name).stem in shipped:
        return None
    return f"no config named {name!r} in {CONF_DIR}; shipped: {', '.join(shipped)} (or give --config-path)"


def main() -> None:
    """Console entry: a NeMo ``hydra_runner`` rooted at the packaged configs."""
    from nemo.core.config import hydra_runner

    problem = check_config_name(sys.argv[1:])
    if problem:
        print(f"[layerfx] error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)

    hydra_runner(config_path=CONF_DIR, config_name="conformer_gn")(_main)()


if __name__ == "__main__":
    main()
