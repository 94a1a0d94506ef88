"""Reset states for the importance probe: step-0 snapshots (re-init), fresh draws (re-rand), exact restore, churn.

A *unit* is a whole Conformer layer (``block``) or one of its modules with its pre-norm (``module``: ffn1 / attn /
conv / ffn2). Snapshots are keyed ``layers.{i}.{name}`` over every layer tensor (parameters and buffers).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from nemo_layerfx.models import conformer_encoder
from nemo_layerfx.units import MODULES  # unit=module: each sub-module with its pre-norm



def probed_encoder(model: nn.Module) -> nn.Module:
    """The Conformer encoder, refusing parameter-shared layers: resetting "layer i" would reset a parameter set
    that other depths use too, so the question the probe asks has no per-layer answer."""
    enc = conformer_encoder(model)
    if getattr(enc, "share_layers", None) is not None:
        raise ValueError(f"the encoder shares parameters between layers (share_layers={enc.share_layers}); a reset "
                         f"of one layer would reset others: probe the unshared copy (`layerfx unshare`, "
                         f"nemo_layerfx.depth.unshare), or use `layerfx depth-sweep` for a per-depth curve")
    return enc


# --- init snapshots -----------------------------------------------------------------------------------------
def _layer_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every encoder layer tensor (parameters and buffers) under its snapshot key ``layers.{i}.{name}``."""
    for i, layer in enumerate(conformer_encoder(model).layers):
        for k, v in layer.state_dict().items():
            yield f"layers.{i}.{k}", v


def layer_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every encoder layer tensor, keyed ``layers.{i}.{name}``."""
    return {k: v.detach().cpu().clone() for k, v in _layer_tensors(model)}


def save_snapshot(snapshot: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors file (no pickle); written to a temporary name first, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in snapshot.items()}, str(tmp))
    tmp.replace(path)


def load_snapshot(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such init snapshot: {path}")
    return load_file(str(path))


def check_snapshot(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """The snapshot must hold exactly this encoder's layer tensors with the same shapes."""
    expected = {k: v.shape for k, v in _layer_tensors(model)}  # shapes only: no copy of the weights
    missing = sorted(set(expected) - set(snapshot))
    extra = sorted(set(snapshot) - set(expected))
    wrong = sorted(k for k in set(expected) & set(snapshot) if tuple(snapshot[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        detail = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                  "shape mismatch " + ", ".join(f"{k}: {tuple(snapshot[k].shape)} vs model {tuple(expected[k])}"
                                                for k in wrong[:3]) if wrong else ""]
        raise ValueError("init snapshot does not match the model: " + "; ".join(d for d in detail if d))


# --- resets ---------------------------------------------------------------------------------------------------
def fresh_draw(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A new state for ``module`` from its own initializers, drawn on CPU under ``seed``.

    The global RNG streams are untouched (the draw uses a forked CPU generator), so probing mid-training does
    not change what training samples next.
    """
    fresh = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            for name in ("pos_bias_u", "pos_bias_v"):  # NeMo initializes these to zero
                if isinstance(getattr(m, name, None), nn.Parameter):
                    nn.init.zeros_(getattr(m, name))
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


@contextmanager
def swapped(module: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load ``state`` into ``module``; the original values come back exactly, also on error."""
    own = module.state_dict()
    saved = {k: v.detach().clone() for k, v in own.items()}
    try:
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)


def probe_units(model: nn.Module, unit: str, depth: int | None = None) -> list[tuple[str, int, nn.Module]]:
    """(name, layer index, module to reset) for every probe unit of the first ``depth`` layers (default: all)."""
    enc = probed_encoder(model)
    layers = list(enc.layers)[:depth]
    if unit == "block":
        return [(f"layers.{i}", i, layer) for i, layer in enumerate(layers)]
    units = []
    for i, layer in enumerate(layers):
        for part, spec in MODULES.items():
            units.append((f"layers.{i}.{part}", i, nn.ModuleDict({n: getattr(layer, n) for n in spec.parts})))
    return units


def init_state(module: nn.Module, layer_idx: int, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step-0 values of ``module`` (a layer or part of layer ``layer_idx``) from a layer snapshot."""
    return {k: snapshot[f"layers.{layer_idx}.{k}"] for k in module.state_dict()}


def churn(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Zhou's weight-update metric per layer: ||W_t - W_0||_F over each module kind, divided by its max over layers."""
    enc = conformer_encoder(model)
    raw: dict[str, list[float]] = {k: [] for k in ("block", *MODULES)}
    for i, layer in enumerate(enc.layers):
        sq = {k: 0.0 for k in raw}
        for name, value in layer.state_dict().items():
            if not value.is_floating_point():
                continue
            d = float((value.detach().cpu() - snapshot[f"layers.{i}.{name}"]).pow(2).sum())
            sq["block"] += d
            for part, spec in MODULES.items():
                if name.split(".")[0] in spec.parts:
                    sq[part] += d
        for k in raw:
            raw[k].append(math.sqrt(sq[k]))
    return {k: [v / max(vals) if max(vals) > 0 else 0.0 for v in vals] for k, vals in raw.items()}
