"""The one place that knows how a Conformer layer's tensors map to prunable units, and how they are named.

One vocabulary, used everywhere:

- *modules* (``MODULES``): the four sub-modules of a layer with their pre-norms, in forward order: ``ffn1``,
  ``attn``, ``conv``, ``ffn2``. The importance probe resets them, low-rank training factorizes their ``linears``.
- *unit kinds* (``UNIT_MAP``): the smallest slices one can remove from a layer while the rest stays a dense,
  smaller layer. Each kind declares its tensors (``slices``), how many it has and how wide each is (``count``,
  ``width``), the tensor that carries it into the residual stream (``outgoing``) and where a pruning gate masks it
  (``gate_at``):

  - ``ffn1`` / ``ffn2``: one hidden unit of ``feed_forward{1,2}``: row i of ``linear1`` (and its bias), column i of
    ``linear2``.
  - ``head``: one attention head: rows ``[h*d_k, (h+1)*d_k)`` of ``linear_q/k/v`` and ``linear_pos``, the same
    columns of ``linear_out``, and row h of ``pos_bias_u/v``.
  - ``qk``: one query/key dimension of one head: row j of ``linear_q``, ``linear_k`` and ``linear_pos`` and entry j
    of ``pos_bias_u/v`` (flattened, head after head). With it the score term it feeds is gone.
  - ``v``: one value dimension of one head: row j of ``linear_v`` and column j of ``linear_out``.
  - ``conv``: one GroupNorm *group* of the conv module: its channels c in ``pointwise_conv1`` (both GLU halves, c
    and c + C), ``depthwise_conv``, the norm's affine parameters and column c of ``pointwise_conv2``. Whole groups
    keep the surviving groups' statistics unchanged, so a submodel equals the full model with those groups masked.

- *unit sets*: federated dropout drops whole heads (``FD_KINDS``); pruning removes query/key and value dimensions
  per head (``PRUNE_KINDS``), so a pruned layer's heads can differ in width (``RaggedMultiHeadAttention``). Each
  set partitions a layer's sliceable tensors.
- config words (``ffn`` for both FFNs, ``att`` for the attention module) are mapped to this vocabulary once, by
  ``resolve``.

Everything else in a layer (the five LayerNorms, the output biases ``linear2.bias``, ``linear_out.bias``,
``pointwise_conv2.bias``) has width d_model and is never sliced; ``FIXED`` lists it, and tests check that each
unit set and ``FIXED`` together account for every tensor of a layer, and that the modules' parts do. Federated-
dropout extraction, pruning, low rank and importance read these tables; nothing else names layer tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Slice:
    """One tensor of a unit kind: ``path`` inside a ConformerLayer, the dimension that indexes units, and how.

    rule: ``channel`` (the unit's channels), ``glu`` (its channels in both GLU halves: c and c + C), ``unit``
    (one row per unit, e.g. ``pos_bias_u[h]``) or ``flat`` (entries of the flattened tensor, e.g. ``pos_bias_u``
    entries per query dimension).
    """

    path: str
    dim: int
    rule: str = "channel"


@dataclass(frozen=True)
class Module:
    """One of the four sub-modules of a Conformer layer: its pre-norm, itself, and its dense linear maps (the
    conv module's pointwise convs are kernel-1 Conv1d, i.e. linear maps over channels)."""

    norm: str
    name: str
    linears: tuple[str, ...]

    @property
    def parts(self) -> tuple[str, str]:
        return self.norm, self.name


@dataclass(frozen=True)
class UnitKind:
    """A kind of prunable unit (module doc). ``gate_at``: the modules a pruning gate wraps, masking their input
    (``gate_input``, along ``gate_dim``) or their output (the first of several draws the mask, the others reuse it);
    empty for a kind no gate masks (whole heads)."""

    module: str
    slices: tuple[Slice, ...]
    count: Callable[[nn.Module], int]
    width: Callable[[nn.Module], int]
    outgoing: str | None = None  # whose input columns carry the unit on (zeroed: the unit adds nothing)
    gate_at: tuple[str, ...] = ()
    gate_input: bool = True
    gate_dim: int = -1


def grouped_conv(layer: nn.Module) -> bool:
    """Whether the layer's conv module has our group-wise norm (conv units are its groups)."""
    return hasattr(getattr(layer.conv, "batch_norm", None), "num_groups")


def _head_width(layer: nn.Module) -> int:
    if getattr(layer.self_attn, "qk_dims", None) is not None:
        raise ValueError("this layer's heads have their own widths (a pruned model): whole heads cannot be "
                         "sliced; drop ffn or conv units only")
    return layer.self_attn.d_k


def _conv_count(layer: nn.Module) -> int:  # a pretrained model's own BatchNorm / LayerNorm: one unit, never dropped
    return layer.conv.batch_norm.num_groups if grouped_conv(layer) else 1


def _conv_width(layer: nn.Module) -> int:
    norm = layer.conv.batch_norm
    return norm.num_channels // norm.num_groups if grouped_conv(layer) else layer.conv.depthwise_conv.out_channels


MODULES: dict[str, Module] = {
    "ffn1": Module("norm_feed_forward1", "feed_forward1", ("feed_forward1.linear1", "feed_forward1.linear2")),
    "attn": Module("norm_self_att", "self_attn", tuple(f"self_attn.linear_{p}" for p in ("q", "k", "v", "out", "pos"))),
    "conv": Module("norm_conv", "conv", ("conv.pointwise_conv1", "conv.pointwise_conv2")),
    "ffn2": Module("norm_feed_forward2", "feed_forward2", ("feed_forward2.linear1", "feed_forward2.linear2")),
}


def _ffn(i: str) -> UnitKind:
    name = f"feed_forward{i}"
    return UnitKind(f"ffn{i}", (Slice(f"{name}.linear1.weight", 0), Slice(f"{name}.linear1.bias", 0),
                                Slice(f"{name}.linear2.weight", 1)),
                    count=lambda layer: getattr(layer, name).linear1.out_features, width=lambda layer: 1,
                    outgoing=f"{name}.linear2.weight", gate_at=(f"{name}.linear2",))


UNIT_MAP: dict[str, UnitKind] = {
    "ffn1": _ffn("1"),
    "ffn2": _ffn("2"),
    "head": UnitKind(
        "attn",
        tuple(Slice(f"self_attn.linear_{p}.{t}", 0) for p in "qkv" for t in ("weight", "bias"))
        + (Slice("self_attn.linear_pos.weight", 0), Slice("self_attn.linear_out.weight", 1),
           Slice("self_attn.pos_bias_u", 0, "unit"), Slice("self_attn.pos_bias_v", 0, "unit")),
        count=lambda layer: layer.self_attn.h, width=_head_width, outgoing="self_attn.linear_out.weight"),
    "qk": UnitKind(
        "attn",
        tuple(Slice(f"self_attn.linear_{p}.{t}", 0) for p in "qk" for t in ("weight", "bias"))
        + (Slice("self_attn.linear_pos.weight", 0), Slice("self_attn.pos_bias_u", 0, "flat"),
           Slice("self_attn.pos_bias_v", 0, "flat")),
        count=lambda layer: layer.self_attn.linear_q.out_features, width=lambda layer: 1,
        # NeMo's attention projects the keys before the positions: linear_k draws the mask, linear_pos reuses it
        gate_at=("self_attn.linear_k", "self_attn.linear_pos"), gate_input=False),
    "v": UnitKind(
        "attn",
        (Slice("self_attn.linear_v.weight", 0), Slice("self_attn.linear_v.bias", 0),
         Slice("self_attn.linear_out.weight", 1)),
        count=lambda layer: layer.self_attn.linear_v.out_features, width=lambda layer: 1,
        outgoing="self_attn.linear_out.weight", gate_at=("self_attn.linear_v",), gate_input=False),
    "conv": UnitKind(
        "conv",
        (Slice("conv.pointwise_conv1.weight", 0, "glu"), Slice("conv.pointwise_conv1.bias", 0, "glu"),
         Slice("conv.depthwise_conv.weight", 0), Slice("conv.depthwise_conv.bias", 0),
         Slice("conv.batch_norm.weight", 0), Slice("conv.batch_norm.bias", 0),
         Slice("conv.pointwise_conv2.weight", 1)),
        count=_conv_count, width=_conv_width, outgoing="conv.pointwise_conv2.weight",
        gate_at=("conv.pointwise_conv2",), gate_dim=1),
}
FD_KINDS = ("ffn1", "ffn2", "head", "conv")  # federated dropout: whole heads
PRUNE_KINDS = ("ffn1", "ffn2", "qk", "v", "conv")  # adaptive-dropout pruning: per-head query/key and value dims
FIXED = ("norm_feed_forward1.", "norm_self_att.", "norm_conv.", "norm_feed_forward2.", "norm_out.",
         "feed_forward1.linear2.bias", "feed_forward2.linear2.bias", "self_attn.linear_out.bias",
         "conv.pointwise_conv2.bias")
# config words -> the vocabulary above (``ffn`` means both FFNs; ``att`` is the attention module's config key)
WORDS: dict[str, tuple[str, ...]] = {"ffn": ("ffn1", "ffn2"), "att": ("attn",)}


def resolve(word: str) -> tuple[str, ...]:
    """The unit kinds or modules a config word names: ``ffn`` -> ffn1, ffn2; ``att`` -> attn; others themselves."""
    return WORDS.get(word, (word,))


def unit_kind(name: str) -> UnitKind:
    """The declaration of unit kind ``name`` (a clear error for an unknown one)."""
    try:
        return UNIT_MAP[name]
    except KeyError:
        raise ValueError(f"unknown unit kind {name!r}; choose from {', '.join(UNIT_MAP)}") from None


def linears(word: str) -> tuple[str, ...]:
    """The dense linear paths of the modules ``word`` names (``att``, ``ffn``, ``conv``, or a module name)."""
    return tuple(p for m in resolve(word) for p in MODULES[m].linears)


def n_units(layer: nn.Module, kind_name: str) -> int:
    """How many units of ``kind_name`` the layer has now."""
    return unit_kind(kind_name).count(layer)


def unit_width(layer: nn.Module, kind_name: str) -> int:
    """Channels per unit: 1 for an FFN unit or a head dimension, d_k for a head, the group size for a conv group."""
    return unit_kind(kind_name).width(layer)


def head_dims(layer: nn.Module, kind: str) -> list[int]:
    """Per-head widths of the ``qk`` or ``v`` dimensions (d_k each in a full-width layer)."""
    attn = layer.self_attn
    widths = getattr(attn, "qk_dims" if kind == "qk" else "v_dims", None)
    return list(widths) if widths is not None else [attn.d_k] * attn.h


def per_head(layer: nn.Module, kind: str, units: torch.Tensor) -> list[int]:
    """How many of the kept ``qk`` / ``v`` dimensions ``units`` (flat indices) fall in each head."""
    counts, start = [], 0
    for width in head_dims(layer, kind):
        counts.append(int(((units >= start) & (units < start + width)).sum()))
        start += width
    return counts


def check_sliceable(encoder: nn.Module, conv_units: bool = True) -> None:
    """Fail unless every layer is a dense, unshared Conformer layer whose conv norm is our group-wise GroupNorm
    (``conv_units=False``: any conv norm, for a surgery that keeps every conv channel)."""
    from nemo_layerfx.encoder.conv import MaskedConformerConvolution

    if getattr(encoder, "share_layers", None) is not None:
        raise ValueError(f"the encoder shares parameters between layers (share_layers={encoder.share_layers}); units "
                         f"are slices of one layer's tensors, so a shared model cannot be sliced: unshare it first "
                         f"(`layerfx unshare` / nemo_layerfx.depth.unshare)")
    for i, layer in enumerate(getattr(encoder, "layers", [])):
        if conv_units and not isinstance(getattr(layer, "conv", None), MaskedConformerConvolution):
            raise ValueError(
                f"encoder layer {i} has a {type(getattr(layer, 'conv', None)).__name__} conv module; only "
                f"GroupNormConformerEncoder layers can be sliced (a BatchNorm or LayerNorm conv norm has no "
                f"groups to drop): convert the model with `layerfx convert-norm` first")
        if getattr(layer.self_attn, "linear_q", None) is None:
            raise ValueError(f"encoder layer {i}: attention without linear_q/k/v projections cannot be sliced")
        for path in (p for m in MODULES.values() for p in m.linears):
            module = find_module(layer, path)
            if module is not None and not isinstance(module, (nn.Linear, nn.Conv1d)):
                raise ValueError(
                    f"encoder layer {i}: {path} is a {type(module).__name__}, not a dense layer; units are slices of "
                    f"dense weights: undo it first (a factorized layer: `layerfx merge` / nemo_layerfx.lowrank.merge; "
                    f"adaptive-dropout gates: `layerfx prune` or nemo_layerfx.pruning.remove_gates)")


def find_module(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or None when the layer has none (e.g. linear_pos without rel_pos attention)."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def layer_tensor_index(layer: nn.Module, kind: str, units: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """For kept unit indices ``units`` of ``kind``: tensor path -> (dim, indices along dim) inside the layer
    (dim -1: indices into the flattened tensor)."""
    if kind == "head" and getattr(layer.self_attn, "qk_dims", None) is not None and len(units) == n_units(layer, kind):
        return {}  # a pruned layer keeping every head: nothing to slice (its heads have their own widths)
    width = unit_width(layer, kind)
    channels = (units[:, None] * width + torch.arange(width)).reshape(-1)
    total = n_units(layer, kind) * width
    own = dict(layer.named_parameters())
    out = {}
    for s in unit_kind(kind).slices:
        if s.path not in own:  # e.g. linear_pos only exists with rel_pos attention, biases with use_bias
            continue
        idx = {"channel": channels, "glu": torch.cat([channels, channels + total]), "unit": units,
               "flat": channels}[s.rule]
        out[s.path] = (-1 if s.rule == "flat" else s.dim, idx)  # dim -1: index the flattened tensor
    return out
