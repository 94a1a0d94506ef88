"""The unit map is the one table that names layer tensors: it must account for every tensor of a layer, and each of
its declarations (counts, widths, outgoing tensors, gate sites, module parts, linears) must fit a real layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nemo_layerfx.encoder import GroupNormConformerEncoder
from nemo_layerfx.units import (
    FD_KINDS, FIXED, MODULES, PRUNE_KINDS, UNIT_MAP, find_module, linears, n_units, resolve, unit_kind, unit_width,
)


def layer(attention: str = "rel_pos") -> nn.Module:
    torch.manual_seed(0)
    return GroupNormConformerEncoder(feat_in=20, n_layers=1, d_model=32, n_heads=4, conv_norm_type="group_norm4",
                                     ff_hidden=[[48, 40]], self_attention_model=attention).layers[0]


@pytest.mark.unit
@pytest.mark.parametrize("kinds", [FD_KINDS, PRUNE_KINDS], ids=["federated-dropout", "pruning"])
@pytest.mark.parametrize("attention", ["rel_pos", "abs_pos"])
def test_each_unit_set_and_fixed_partition_a_layers_tensors(kinds, attention):
    lay = layer(attention)
    owner: dict[str, str] = {}
    for k in kinds:
        for s in UNIT_MAP[k].slices:
            assert s.path not in owner, f"{s.path} is in both {owner[s.path]} and {k}"
            owner[s.path] = k
    for name, _ in lay.named_parameters():
        assert (name in owner) != name.startswith(FIXED), f"{name} must be in exactly one of {kinds} / FIXED"


@pytest.mark.unit
def test_every_parameter_belongs_to_exactly_one_module():
    lay = layer()
    for name, _ in lay.named_parameters():
        parts = [m for m, spec in MODULES.items() if name.split(".")[0] in spec.parts]
        assert len(parts) == (0 if name.startswith("norm_out.") else 1), f"{name}: modules {parts}"
        for m in parts:  # the module's linears are inside its own part
            assert all(p.split(".")[0] == MODULES[m].name for p in MODULES[m].linears)
    for m in MODULES:
        for path in linears(m):
            assert isinstance(find_module(lay, path), (nn.Linear, nn.Conv1d)), path


@pytest.mark.unit
def test_counts_widths_and_slices_agree_with_the_tensors():
    lay = layer()
    assert {k: n_units(lay, k) for k in UNIT_MAP} == {"ffn1": 48, "ffn2": 40, "head": 4, "qk": 32, "v": 32, "conv": 4}
    assert {k: unit_width(lay, k) for k in UNIT_MAP} == {"ffn1": 1, "ffn2": 1, "head": 8, "qk": 1, "v": 1, "conv": 8}
    params = dict(lay.named_parameters())
    for k, spec in UNIT_MAP.items():
        channels = n_units(lay, k) * unit_width(lay, k)
        for s in spec.slices:
            p = params[s.path]
            size = {"channel": p.shape[s.dim], "glu": p.shape[s.dim] // 2, "unit": p.shape[s.dim] * unit_width(lay, k),
                    "flat": p.numel()}[s.rule]
            assert size == channels, f"{k}: {s.path} indexes {size} channels, not {channels}"
        if spec.outgoing is not None:  # its columns carry the unit into the residual stream
            assert params[spec.outgoing].shape[1] == channels and spec.outgoing in {s.path for s in spec.slices}


@pytest.mark.unit
def test_gate_sites_are_the_linears_whose_input_or_output_carries_the_units():
    lay = layer()
    for k in PRUNE_KINDS:
        spec = unit_kind(k)
        assert spec.gate_at, f"{k} has no gate site"
        for path in spec.gate_at:
            m = find_module(lay, path)
            width = m.weight.shape[1] if spec.gate_input else m.weight.shape[0]
            assert width == n_units(lay, k) * unit_width(lay, k), f"{k}: {path}"
            assert path in linears(spec.module)
    assert unit_kind("head").gate_at == ()  # whole heads are dropped (federated dropout), never gated


@pytest.mark.unit
def test_config_words_map_to_the_vocabulary_once():
    assert resolve("ffn") == ("ffn1", "ffn2") and resolve("att") == ("attn",) and resolve("qk") == ("qk",)
    with pytest.raises(ValueError, match="unknown unit kind 'att'"):
        n_units(layer(), "att")
