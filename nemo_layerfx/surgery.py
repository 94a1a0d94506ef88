"""Unit surgery: build a dense, smaller Conformer model that keeps given units, and the index maps between them.

The unit map (``units.py``) says which tensor slices make a unit; this module applies it. Federated-dropout
``extract`` and pruning build their smaller models here; ``mask_units_`` is the reference their exactness tests
compare against (dropped units with zero outgoing weights).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from nemo_layerfx.models import clone_model, conformer_encoder, encoder_prefix
from nemo_layerfx.units import (
    FD_KINDS, PRUNE_KINDS, check_sliceable, grouped_conv, layer_tensor_index, n_units, per_head, unit_kind,
    unit_width,
)

Units = dict[int, dict[str, torch.Tensor]]  # layer -> unit kind -> kept unit indices (sorted)


def sliceable_encoder(model: nn.Module, units: Units | None = None) -> nn.Module:
    """The model's Conformer encoder, checked to be sliceable by the unit map (clear error otherwise). With
    ``units`` that keep every conv channel, any conv norm will do (a pretrained BatchNorm model pruned elsewhere)."""
    enc = conformer_encoder(model)
    check_sliceable(enc, conv_units=units is None or drops_conv(enc, units))
    return enc


def drops_conv(enc: nn.Module, units: Units) -> bool:
    return any(len(units[i]["conv"]) < n_units(layer, "conv") for i, layer in enumerate(enc.layers))


def tensor_index(model: nn.Module, units: Units) -> dict[str, tuple[int, torch.Tensor]]:
    """state_dict key -> (dim, kept indices) for every sliced tensor of ``model`` (the full-size model)."""
    return _tensor_index(sliceable_encoder(model, units), encoder_prefix(model), units)


def _tensor_index(enc: nn.Module, prefix: str, units: Units) -> dict[str, tuple[int, torch.Tensor]]:
    out = {}
    for i, layer in enumerate(enc.layers):
        check_kinds(units[i])
        for kind, kept in units[i].items():
            for path, (dim, idx) in layer_tensor_index(layer, kind, kept).items():
                out[f"{prefix}.layers.{i}.{path}"] = (dim, idx)
    return out


def check_kinds(layer_units: dict[str, torch.Tensor]) -> None:
    """A layer's units are federated dropout's kinds (whole heads) or pruning's (per-head dims), never both."""
    kinds = set(layer_units)
    if kinds not in (set(FD_KINDS), set(PRUNE_KINDS)):
        raise ValueError(f"a layer's kept units must name the kinds {', '.join(FD_KINDS)} or {', '.join(PRUNE_KINDS)}; "
                         f"got {', '.join(sorted(kinds))}")


def slice_state(state: dict[str, torch.Tensor], index: dict[str, tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The submodel's tensors: each indexed tensor sliced (dim -1: its flattened entries), the rest shared as they
    are (not copied)."""
    out = {}
    for k, v in state.items():
        if k not in index:
            out[k] = v
            continue
        dim, idx = index[k]
        out[k] = v.reshape(-1).index_select(0, idx.to(v.device)) if dim == -1 else v.index_select(dim, idx.to(v.device))
    return out


def submodel_widths(model: nn.Module, units: Units) -> dict[str, list]:
    """Encoder config entries of the submodel: ``ff_hidden``, ``conv_channels``, ``conv_groups`` and either
    ``layer_n_heads`` (whole heads kept) or ``layer_qk_dims`` / ``layer_v_dims`` (per-head widths)."""
    return _widths(sliceable_encoder(model, units), units)


def _widths(enc: nn.Module, units: Units) -> dict[str, list]:
    per_head_dims = "qk" in units[0]
    widths: dict[str, list] = {"ff_hidden": [], "conv_channels": [], "conv_groups": []}
    widths.update({"layer_qk_dims": [], "layer_v_dims": []} if per_head_dims else {"layer_n_heads": []})
    for i, layer in enumerate(enc.layers):
        u = units[i]
        widths["ff_hidden"].append([len(u["ffn1"]), len(u["ffn2"])])
        if per_head_dims:
            widths["layer_qk_dims"].append(per_head(layer, "qk", u["qk"]))
            widths["layer_v_dims"].append(per_head(layer, "v", u["v"]))
        else:
            widths["layer_n_heads"].append(len(u["head"]))
        widths["conv_groups"].append(len(u["conv"]))
        widths["conv_channels"].append(len(u["conv"]) * unit_width(layer, "conv"))
    if not all(grouped_conv(layer) for layer in enc.layers):  # a model's own BatchNorm: every channel kept
        del widths["conv_groups"], widths["conv_channels"]
    return widths


def build_submodel(model: nn.Module, units: Units) -> nn.Module:
    """A new, dense model of ``model``'s class keeping ``units`` (d_model fixed); ``model`` is not modified.

    The encoder config of the result states its per-layer widths (``ff_hidden``, ``layer_n_heads``,
    ``conv_channels``, ``conv_groups``), so ``save_to`` / ``restore_from`` rebuild it; the tensors are copies.
    """
    from omegaconf import open_dict

    enc = sliceable_encoder(model, units)  # checked once; the old encoder is never copied
    prefix = encoder_prefix(model)
    sub_enc_cfg = copy.deepcopy(model.cfg.encoder)
    with open_dict(sub_enc_cfg):
        sub_enc_cfg.update(_widths(enc, units))
    new_encoder = type(enc).from_config_dict(sub_enc_cfg).to(next(enc.parameters()).device)
    sub = clone_model(model, replace={enc: new_encoder})
    sliced = slice_state(model.state_dict(), _tensor_index(enc, prefix, units))
    sub.load_state_dict({k: v.clone() for k, v in sliced.items()}, strict=True)
    with open_dict(sub._cfg):
        sub._cfg.encoder = sub_enc_cfg
    return sub


def units_to_lists(units: Units) -> dict[str, dict[str, list[int]]]:
    """JSON-safe form of a unit map (for payloads, checkpoints and ``cfg.fd_submodel``)."""
    return {str(i): {k: v.tolist() for k, v in u.items()} for i, u in units.items()}


def units_from_lists(d: dict) -> Units:
    return {int(i): {k: torch.tensor(v, dtype=torch.long) for k, v in u.items()} for i, u in d.items()}


def units_param_count(model: nn.Module, keep: Callable[[int, str, int], int], kinds: tuple[str, ...] = FD_KINDS) -> int:
    """Parameters of the model that keeps ``keep(layer, kind, n)`` units of each kind: arithmetic on the unit map
    (the flat rule counts one entry per unit)."""
    enc = conformer_encoder(model)
    drops_conv_units = "conv" in kinds and any(keep(i, "conv", n_units(layer, "conv")) < n_units(layer, "conv")
                                               for i, layer in enumerate(enc.layers))
    check_sliceable(enc, conv_units=drops_conv_units)  # as sliceable_encoder: any conv norm when no group goes
    total = sum(p.numel() for p in model.parameters())
    params = dict(enc.named_parameters())
    for i, layer in enumerate(enc.layers):
        for kind in kinds:
            n = n_units(layer, kind)
            kept = keep(i, kind, n)
            if kept == n:
                continue
            per_unit = 0
            for s in unit_kind(kind).slices:
                p = params.get(f"layers.{i}.{s.path}")
                if p is None:
                    continue
                if s.rule == "flat":
                    per_unit += 1
                    continue
                channels = {"channel": unit_width(layer, kind), "glu": 2 * unit_width(layer, kind), "unit": 1}[s.rule]
                per_unit += p.numel() // p.shape[s.dim] * channels
            total -= (n - kept) * per_unit
    return total


@torch.no_grad()
def mask_units_(model: nn.Module, units: Units) -> None:
    """In place: zero the outgoing weights of every dropped unit, so ``model`` computes what the submodel computes.

    The reference for the exactness tests: an FFN unit, head or conv group with zero outgoing weights adds nothing.
    """
    enc = sliceable_encoder(model)
    for i, layer in enumerate(enc.layers):
        for kind in FD_KINDS:
            out_path, n = unit_kind(kind).outgoing, n_units(layer, kind)
            dropped = torch.tensor(sorted(set(range(n)) - set(units[i][kind].tolist())), dtype=torch.long)
            if len(dropped):
                _, idx = layer_tensor_index(layer, kind, dropped)[out_path]
                layer.get_parameter(out_path).index_fill_(1, idx.to(layer.get_parameter(out_path).device), 0.0)
