"""Put adaptive-dropout gates into a Conformer encoder, read their decisions, and take them out again.

Each gated layer gets a ``adaptive_dropout`` ModuleDict (the gates: ffn1, ffn2, qk, v, conv) and its gated
modules are wrapped (``GatedInput`` / ``GatedOutput``); the encoder gets the shared ``adaptive_dropout_schedule``.
"""

from __future__ import annotations

import torch
from omegaconf import open_dict
from torch import nn

from nemo_layerfx.encoder import layer_sets
from nemo_layerfx.models import adopt_, clone_model, conformer_encoder
from nemo_layerfx.pruning.config import AdaptiveDropoutConfig
from nemo_layerfx.pruning.gates import GatedInput, GatedOutput, GateSchedule, RetentionGate
from nemo_layerfx.surgery import Units
from nemo_layerfx.units import PRUNE_KINDS, check_sliceable, n_units, unit_width

# location -> (unit kinds it gates)
LOCATION_KINDS = {"ffn": ("ffn1", "ffn2"), "qk": ("qk",), "v": ("v",), "conv": ("conv",)}


def _wrap(layer: nn.Module, path: str, wrapper) -> None:
    parent, _, name = path.rpartition(".")
    owner = layer.get_submodule(parent)
    setattr(owner, name, wrapper(getattr(owner, name)))


def add_gates_(encoder: nn.Module, config: AdaptiveDropoutConfig) -> None:
    """In place: gate every layer's units at ``config.locations``; β′ = 0, so every gate starts at c₀ (no dropout)."""
    if any(type(m).__name__ == "LowRankLinear" for m in encoder.modules()):
        raise ValueError("adaptive_dropout cannot be combined with low_rank: pruning removes rows and columns of "
                         "dense weights (merge the low-rank model first: `layerfx merge`)")
    # unshared, dense layers (and a GroupNorm conv module where conv groups are gated): what prune can slice
    check_sliceable(encoder, conv_units="conv" in config.locations)
    if getattr(encoder, "adaptive_dropout_schedule", None) is not None:
        raise ValueError("the encoder already has adaptive_dropout gates")
    schedule = GateSchedule(config)
    encoder.adaptive_dropout_schedule = schedule
    for layer in layer_sets(encoder):
        gates = nn.ModuleDict()
        for location in config.locations:
            for kind in LOCATION_KINDS[location]:
                gates[kind] = RetentionGate(n_units(layer, kind), unit_width(layer, kind), schedule)
        layer.adaptive_dropout = gates
        for kind, gate in gates.items():
            if kind in ("ffn1", "ffn2"):
                _wrap(layer, f"feed_forward{kind[-1]}.linear2", lambda m, g=gate: GatedInput(m, g))
            elif kind == "qk":
                # NeMo's attention projects the keys before the positions: linear_k draws, linear_pos reuses
                paired = hasattr(layer.self_attn, "linear_pos")
                _wrap(layer, "self_attn.linear_k", lambda m, g=gate: GatedOutput(m, g, "draw" if paired else None))
                if paired:
                    _wrap(layer, "self_attn.linear_pos", lambda m, g=gate: GatedOutput(m, g, "reuse"))
            elif kind == "v":
                _wrap(layer, "self_attn.linear_v", lambda m, g=gate: GatedOutput(m, g))
            else:
                _wrap(layer, "conv.pointwise_conv2", lambda m, g=gate: GatedInput(m, g, dim=1))


def apply_option(encoder: nn.Module, value) -> None:
    """The ``adaptive_dropout`` encoder option."""
    add_gates_(encoder, AdaptiveDropoutConfig.from_any(value))


def gated_encoder(model: nn.Module) -> nn.Module:
    enc = conformer_encoder(model)
    if getattr(enc, "adaptive_dropout_schedule", None) is None:
        raise ValueError("the model has no adaptive_dropout gates (train one with "
                         "model.encoder.adaptive_dropout, or add them with nemo_layerfx.pruning.add_gates)")
    return enc


def gates_of(model: nn.Module) -> list[dict[str, RetentionGate]]:
    """Per layer: unit kind -> its gate."""
    return [dict(layer.adaptive_dropout.items()) for layer in gated_encoder(model).layers]


def kept_units(model: nn.Module) -> tuple[Units, list[str]]:
    """Per layer and kind, the units whose β ≥ c∞ (all units of ungated kinds), keeping at least ``min_units`` of
    each (the largest β); returns the units and a note for every layer where ``min_units`` overrode the gates."""
    enc = gated_encoder(model)
    cfg = enc.adaptive_dropout_schedule.config
    units: Units = {}
    notes: list[str] = []
    with torch.no_grad():
        for i, layer in enumerate(enc.layers):
            units[i] = {}
            for kind in PRUNE_KINDS:
                gate = layer.adaptive_dropout[kind] if kind in layer.adaptive_dropout else None
                if gate is None:
                    units[i][kind] = torch.arange(n_units(layer, kind))
                    continue
                beta = gate.beta().detach().cpu()
                keep = torch.nonzero(beta >= cfg.c_inf).flatten()
                if len(keep) < min(cfg.min_units, gate.n):
                    keep = beta.topk(min(cfg.min_units, gate.n)).indices.sort().values
                    notes.append(f"layers.{i}.{kind}: every unit is below c_inf; kept the {len(keep)} with the "
                                 f"largest β (min_units={cfg.min_units})")
                units[i][kind] = keep
    return units, notes


def strip_gates_(encoder: nn.Module) -> None:
    """In place: every wrapper replaced by its base layer; gates and schedule removed."""
    for name, module in list(encoder.named_modules()):
        if isinstance(module, (GatedInput, GatedOutput)):
            parent, _, attr = name.rpartition(".")
            setattr(encoder.get_submodule(parent), attr, module.base_layer)
    for layer in layer_sets(encoder):
        if "adaptive_dropout" in layer._modules:
            del layer._modules["adaptive_dropout"]
    if "adaptive_dropout_schedule" in encoder._modules:
        del encoder._modules["adaptive_dropout_schedule"]


def remove_gates(model: nn.Module) -> nn.Module:
    """A new model without gates (the wrapped layers as they are, every unit kept); ``model`` is unchanged."""
    gated_encoder(model)
    new = clone_model(model)
    strip_gates_(conformer_encoder(new))
    with open_dict(new._cfg):
        new._cfg.encoder.pop("adaptive_dropout", None)
    return new


def add_gates(model: nn.Module, config: AdaptiveDropoutConfig | dict) -> nn.Module:
    """A new model with gates on its encoder (to fine-tune a trained dense model with adaptive dropout); its
    config records them, so ``save_to`` / ``restore_from`` rebuild the gated model. ``model`` is unchanged."""
    config = AdaptiveDropoutConfig.from_any(config)
    new = clone_model(model)
    adopt_(new)  # NeMo's stock encoder: ours with its own norm and tensors, whose config carries the gates
    add_gates_(conformer_encoder(new), config)
    with open_dict(new._cfg):
        new._cfg.encoder.adaptive_dropout = config.to_dict()
    return new
