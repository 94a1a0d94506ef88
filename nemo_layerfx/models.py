"""Core helpers every capability uses on a NeMo ASR model: find its Conformer encoder, restore, copy and save.

Capabilities (importance, federated dropout, depth, pruning, low rank) import these instead of each other.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from nemo_layerfx.quiet import without_nemo_warnings


def conformer_encoder(model: nn.Module) -> nn.Module:
    """The model's Conformer encoder (ours or NeMo's), or a clear error."""
    from nemo.collections.asr.modules.conformer_encoder import ConformerEncoder

    enc = getattr(model, "encoder", None)
    if not isinstance(enc, ConformerEncoder):
        raise ValueError(f"model has no Conformer encoder (encoder is {type(enc).__name__}); this needs a "
                         f"NeMo ConformerEncoder or nemo_layerfx GroupNormConformerEncoder")
    if getattr(enc, "reduction_position", None) is not None:
        raise ValueError("Conformer encoders with reduction_subsampling are not supported")
    return enc


def eval_depth(encoder: nn.Module) -> int:
    """How many layers an eval-mode forward of this encoder runs: its inference depth (Tian's SLI), or all."""
    return getattr(encoder, "inference_depth", None) or len(encoder.layers)


def adopt_(model: nn.Module) -> bool:
    """In place: a model with NeMo's stock ``ConformerEncoder`` gets ``GroupNormConformerEncoder`` built from the same
    config, with its own conv norm (batch_norm, layer_norm, ...) and every tensor (a strict load), so the options that
    live in our encoder's config (inference depth, low rank, gates) apply to a pretrained model as it is. Returns
    whether anything changed (False for our encoder). NeMo's padding-leaky ``group_norm<G>`` is refused: ours
    computes it without the padding, which is ``layerfx convert-norm``'s job."""
    from omegaconf import OmegaConf, open_dict

    from nemo_layerfx.encoder import ENCODER_TARGET, KEPT_NORMS, GroupNormConformerEncoder

    enc = conformer_encoder(model)
    if isinstance(enc, GroupNormConformerEncoder):
        return False
    cfg = OmegaConf.to_container(model.cfg.encoder, resolve=True)
    norm = str(cfg.get("conv_norm_type", "batch_norm"))
    if norm not in KEPT_NORMS:
        raise ValueError(f"the encoder's conv norm is NeMo's {norm}, which counts padded frames; our encoder "
                         f"computes it over valid frames only: `layerfx convert-norm` the model (the same tensors)")
    cfg.update({"_target_": ENCODER_TARGET, "conv_norm_type": norm})
    ours = GroupNormConformerEncoder.from_config_dict(cfg)
    ours.load_state_dict(enc.state_dict(), strict=True)
    ours.to(next(enc.parameters()).device).train(enc.training)
    model.encoder = ours
    with open_dict(model._cfg):
        model._cfg.encoder._target_ = ENCODER_TARGET
    return True


def encoder_prefix(model: nn.Module) -> str:
    """The state_dict prefix of the model's Conformer encoder (``encoder`` for NeMo's ASR models)."""
    enc = conformer_encoder(model)
    return next(name for name, m in model.named_modules() if m is enc)


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .nemo file: {path}")
    import tarfile

    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is not a .nemo file (a .nemo is a tar archive written by NeMo's save_to)")
    return path


def load_config(path: str | os.PathLike) -> Any:
    """Model config of a ``.nemo`` file, with a clear error if the file is missing or not a NeMo archive."""
    from nemo.collections.asr.models import ASRModel

    path = _check_file(path)
    try:
        return ASRModel.restore_from(str(path), return_config=True, map_location="cpu")
    except Exception as e:  # NeMo raises tarfile/yaml errors of several kinds on a bad archive
        raise ValueError(f"{path} is not a readable .nemo archive ({type(e).__name__}: {e})") from e


# NeMo warns, with the whole data config, that a model built without a trainer or without a test manifest has no
# data loaders: true of every restored model and of configs with no test set, and only noise to our users.
NO_DATA_WARNINGS = ("If you intend to do", "Please call the ModelPT.setup_",
                    "Could not load dataset as `manifest_filepath` was None")


def restore(path: str | os.PathLike, override_config: Any = None, strict: bool = True):
    """``ASRModel.restore_from`` on CPU, with a clear error for a missing, corrupt or truncated archive."""
    from nemo.collections.asr.models import ASRModel

    path = _check_file(path)
    try:
        with without_nemo_warnings(*NO_DATA_WARNINGS):
            return ASRModel.restore_from(str(path), override_config_path=override_config, map_location="cpu",
                                         strict=strict)
    except Exception as e:
        raise ValueError(f"could not restore {path}: {type(e).__name__}: {e}") from e


def check_output(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Refuse to overwrite a command's input; checked before anything is loaded."""
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError(f"refusing to overwrite the input model {src}; give a different output path")


def save_nemo(model: nn.Module, dst: str | os.PathLike) -> Path:
    """``model.save_to(dst)`` atomically: written under a temporary name in the same folder, then renamed, so
    an interrupted save never leaves a half-written ``.nemo`` (nor replaces a good one)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".nemo", dir=dst.parent)
    os.close(fd)
    mask = os.umask(0)  # mkstemp makes the file 0600; the .nemo is an ordinary file, permitted as the umask says
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    try:
        model.save_to(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def clone_model(model: nn.Module, replace: dict[nn.Module, nn.Module] | None = None) -> nn.Module:
    """A deep copy of a NeMo model without its trainer and data loaders (which cannot be copied, and belong to the
    original); the copy's ``training_step`` wrapper is rebuilt for the copy. Methods wrapped on the instance (under
    DDP Lightning wraps ``forward`` in a proxy that cannot be copied) are left to the copy's class.

    ``replace``: submodules the copy takes as given instead of copying them (e.g. a new encoder for a model
    surgery: the old one is never copied)."""
    from nemo.utils import model_utils

    def proxy(v: Any) -> bool:  # a wrapt proxy (its C and Python classes differ: matched by name)
        return any(c.__name__ == "ObjectProxy" for c in type(v).__mro__)

    skip = ("_trainer", "_train_dl", "_validation_dl", "_test_dl", "training_step")
    skip += tuple(k for k, v in model.__dict__.items() if proxy(v) and k not in skip)
    saved = {k: model.__dict__.pop(k) for k in skip if k in model.__dict__}
    try:
        memo: dict[int, Any] = {id(old): new for old, new in (replace or {}).items()}
        clone = copy.deepcopy(model, memo)
    finally:
        model.__dict__.update(saved)
    clone._trainer, clone._train_dl, clone._validation_dl, clone._test_dl = None, None, None, None
    if "training_step" in saved:
        clone.training_step = model_utils.wrap_training_step(clone.training_step)
    return clone


def read_report(report: Any) -> dict:
    """A probe report as a dict, from a ``ProbeReport``, its dict or a probe.json path (clear error if missing)."""
    import json
    from dataclasses import asdict, is_dataclass

    if isinstance(report, (str, Path)):
        path = Path(report)
        if not path.is_file():
            raise FileNotFoundError(f"no such probe report: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a probe report: not JSON ({e})") from None
        if not isinstance(data, dict) or not {"units", "delta_wer"} <= set(data):
            raise ValueError(f"{path} is not a probe report: it has no 'units' and 'delta_wer' (write one with "
                             "`layerfx probe` or the importance callback)")
        return data
    return asdict(report) if is_dataclass(report) else dict(report)


def unit_kind(units: list[str]) -> str:
    """What a probe report's units are: 'blocks' (``layers.i``), 'modules' (``layers.i.ffn1``, ...) or 'other'."""
    dots = {u.count(".") for u in units}
    return {frozenset({1}): "blocks", frozenset({2}): "modules"}.get(frozenset(dots), "other")


def block_layers(report: dict, needed_by: str) -> list[int]:
    """The layer index of each unit of a block-level probe report (``layers.i``), in the report's order.

    Everything that works per layer (dropout plans, rank maps, the depth sweep) reads a block report; a module
    report rates parts of layers, so it is refused, naming ``needed_by`` and the fix."""
    units = list(report.get("units", []))
    if unit_kind(units) != "blocks":
        what = "rates modules" if unit_kind(units) == "modules" else "has units"
        raise ValueError(f"{needed_by} needs a block-level probe report (units 'layers.i'); this one {what} "
                         f"{units[:3]}{'…' if len(units) > 3 else ''}: probe with unit='block' (layerfx probe's "
                         "default)")
    return [int(u.split(".")[1]) for u in units]


def count_params(module: nn.Module) -> int:
    """Distinct parameters (a tensor shared by several layers counts once)."""
    return sum(p.numel() for p in module.parameters())
