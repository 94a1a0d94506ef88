"""Turn a pretrained BatchNorm Conformer ``.nemo`` into the padding-exact GroupNorm variant.

Everything but the conv-module norm is copied unchanged; the GroupNorm affine (weight, bias) is taken from the
BatchNorm affine, and BatchNorm's running statistics are dropped. The converted model computes a different
normalization than the one it was trained with, so fine-tune it before use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from nemo_layerfx.encoder.conv import STOCK_ENCODER_TARGET
from nemo_layerfx.encoder import ENCODER_TARGET
from nemo_layerfx.models import check_output, load_config, restore, save_nemo

CONFORMER_TARGETS = (STOCK_ENCODER_TARGET, "nemo.collections.asr.modules.conformer_encoder.ConformerEncoder",
                     ENCODER_TARGET)
_DROPPED_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class ConversionReport:
    """What ``convert_norm`` changed, for printing and tests."""

    source_target: str
    source_norm: str
    target_norm: str
    n_layers: int
    copied: int = 0
    dropped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"encoder: {self.source_target} -> {ENCODER_TARGET}",
            f"conv norm in {self.n_layers} layers: {self.source_norm} -> {self.target_norm} "
            f"(GroupNorm affine taken from the {self.source_norm} affine)",
            f"tensors copied unchanged: {self.copied}",
        ]
        if self.dropped:
            out.append(f"dropped {len(self.dropped)} running-statistics buffers, e.g. {self.dropped[0]}")
        return out


def convert_norm(src: str | os.PathLike, dst: str | os.PathLike, groups: int = 8) -> ConversionReport:
    """Write ``dst``: the model in ``src`` with a padding-exact GroupNorm(``groups``) conv norm.

    ``src`` is never modified; ``dst`` is written atomically and must differ from ``src``.
    """
    src, dst = Path(src), Path(dst)
    check_output(src, dst)
    cfg = load_config(src)
    enc = cfg.get("encoder", None)
    target = None if enc is None else enc.get("_target_", None)
    if target not in CONFORMER_TARGETS:
        raise ValueError(f"{src} is not a Conformer model: its encoder is {target!r}; convert-norm needs one of "
                         f"{', '.join(CONFORMER_TARGETS)}")
    if target == ENCODER_TARGET:
        raise ValueError(f"{src} already has the padding-exact GroupNorm encoder ({enc.get('conv_norm_type')}); "
                         "nothing to convert")
    d_model = int(enc.d_model)
    if groups < 1 or d_model % groups != 0:
        raise ValueError(f"--groups {groups} must divide d_model={d_model}")
    source_norm = str(enc.get("conv_norm_type", "batch_norm"))
    new_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(new_cfg):
        new_cfg.encoder._target_ = ENCODER_TARGET
        new_cfg.encoder.conv_norm_type = f"group_norm{groups}"

    original = restore(src).state_dict()
    model = restore(src, override_config=new_cfg, strict=False)
    converted = model.state_dict()
    report = ConversionReport(target, source_norm, f"group_norm{groups}", n_layers=int(enc.n_layers))
    missing = [k for k in converted if k not in original]
    if missing:
        raise ValueError(f"conversion left tensors without a source value: {missing[:5]}")
    for key, value in converted.items():
        if not torch.equal(value, original[key].to(value.dtype)):
            raise ValueError(f"tensor {key} was not copied exactly")
        report.copied += 1
    report.dropped = [k for k in original if k not in converted]
    unexpected = [k for k in report.dropped if not k.endswith(_DROPPED_STATS)]
    if unexpected:
        raise ValueError(f"conversion would drop trained tensors: {unexpected[:5]}")

    save_nemo(model, dst)
    return report
