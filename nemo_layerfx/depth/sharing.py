"""Parameter-shared encoders and inference depth, at the model level: unshare, and export an inference depth.

``share_layers`` and ``inference_depth`` are fields of ``GroupNormConformerEncoder`` (the core); this module turns
a shared model into the equivalent unshared one (identical outputs: every depth gets its own copy of the set it
used), which stock NeMo can then load the usual way, and sets a model's inference depth in its config so that
``save_to`` exports it.
"""

from __future__ import annotations

import os

from omegaconf import open_dict
from torch import nn

from nemo_layerfx.models import (
    adopt_, check_output, clone_model, conformer_encoder, count_params, load_config, restore, save_nemo,
)


def unshare(model: nn.Module) -> nn.Module:
    """A new model whose N layers each own their parameters (copies of the set each depth used); ``model`` is
    unchanged and the outputs are identical. Its config has no ``share_layers``."""
    if getattr(conformer_encoder(model), "share_layers", None) is None:
        raise ValueError("nothing to unshare: the encoder's layers do not share parameters (share_layers is not set)")
    new = clone_model(model)
    conformer_encoder(new).unshare_()
    with open_dict(new._cfg):
        new._cfg.encoder.pop("share_layers", None)
    return new


def set_inference_depth(model: nn.Module, depth: int | None) -> nn.Module:
    """In place: eval-mode forwards (``transcribe``, validation, the probe) run the first ``depth`` layers, and the
    model's config says so, so ``save_to`` exports it. None restores the full depth. Returns ``model``. A model with
    NeMo's stock encoder is adopted first (``adopt_``: our encoder class, its own norm and tensors)."""
    if depth is None and not hasattr(conformer_encoder(model), "set_inference_depth"):
        return model  # a stock model runs every layer already
    adopt_(model)  # NeMo's stock encoder: ours with its own norm and tensors, whose config carries the depth
    enc = conformer_encoder(model)
    enc.set_inference_depth(depth)
    with open_dict(model._cfg):
        if depth is None:
            model._cfg.encoder.pop("inference_depth", None)
        else:
            model._cfg.encoder.inference_depth = int(depth)
    return model


def unshare_file(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """``unshare`` from one ``.nemo`` to another (atomic; ``src`` never modified); parameter counts before/after."""
    check_output(src, dst)
    model = restore(src)
    new = unshare(model)
    save_nemo(new, dst)
    return {"before": count_params(model), "after": count_params(new)}


def set_depth_file(src: str | os.PathLike, dst: str | os.PathLike, depth: int | None) -> int:
    """Write ``src`` with an inference depth to ``dst`` (atomic; ``src`` never modified); returns n_layers."""
    check_output(src, dst)
    n = load_config(src).encoder.get("n_layers")  # a depth the config rules out is refused before the model loads
    if depth is not None and n is not None and not 1 <= int(depth) <= int(n):
        raise ValueError(f"inference depth {depth} is not one of the model's {n} layers (1..{n}; 0: all layers)")
    model = set_inference_depth(restore(src), depth)
    save_nemo(model, dst)
    return len(conformer_encoder(model).layers)
