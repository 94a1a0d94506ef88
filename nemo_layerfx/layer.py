"""Our encoder's Conformer block: NeMo's ``ConformerLayer`` and ``ConformerFeedForward`` with fewer passes over the
residual stream, the same parameters and the same numbers bit for bit.

After subsampling a Conformer sees short sequences (a 1-s command: 25 frames), so a block's time is mostly the
per-operator cost of its ~60 operators, each fresh (B, T, d_model) result a new allocation. That cost
does not shrink when pruning narrows a block's FFN, attention or conv module, so it bounds what pruning can win
(``benchmarks/prune.py`` reports it as the floor model). NeMo's block adds each module's output to the residual
stream as ``residual + dropout(y) * fc_factor``: a multiplication, an addition and a new tensor per module. Here:

- ``torch.add(residual, y, alpha=fc_factor)``: one operator; fc_factor is 0.5 or 1, so ``alpha * y`` is exact and
  the sum is NeMo's bit for bit;
- without gradients (inference) the residual stream is updated in place after the first module (the block's input
  is never written), and the FFN's Swish overwrites the first projection's output;
- dropout is not called in eval mode, where it is the identity.

Streaming caches, adapters and NeMo's tensor access (``register_accessible_tensor``) take NeMo's forward.
``GroupNormConformerEncoder`` gives these classes to its blocks (``encoder.lean_modules_``); they have no state of
their own, so checkpoints and NeMo's ``isinstance`` checks are unchanged.
"""

from __future__ import annotations

import torch
from nemo.collections.asr.parts.submodules.conformer_modules import ConformerFeedForward, ConformerLayer

from nemo_layerfx.conv import activate


class LeanConformerFeedForward(ConformerFeedForward):
    """NeMo's FFN; without gradients a Swish activation runs in place on the first projection's fresh output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = activate(self.activation, self.linear1(x))
        if self.training:
            x = self.dropout(x)
        return self.linear2(x)


class LeanConformerLayer(ConformerLayer):
    """NeMo's Conformer block with one operator per residual update, in place without gradients (module doc)."""

    def forward(self, x, att_mask=None, pos_emb=None, pad_mask=None, cache_last_channel=None, cache_last_time=None):
        if (cache_last_channel is not None or cache_last_time is not None
                or self.self_attention_model not in ("rel_pos", "abs_pos") or self.is_adapter_available()
                or self.is_access_enabled(getattr(self, "model_guid", None))):
            return super().forward(x, att_mask, pos_emb, pad_mask, cache_last_channel, cache_last_time)
        in_place = not torch.is_grad_enabled()

        def add(residual: torch.Tensor, y: torch.Tensor, alpha: float, first: bool = False) -> torch.Tensor:
            if self.training:
                y = self.dropout(y)
            if in_place and not first:  # never the block's input
                return residual.add_(y, alpha=alpha)
            return torch.add(residual, y, alpha=alpha)

        residual = add(x, self.feed_forward1(self.norm_feed_forward1(x)), self.fc_factor, first=True)
        h = self.norm_self_att(residual)
        if self.self_attention_model == "rel_pos":
            h = self.self_attn(query=h, key=h, value=h, mask=att_mask, pos_emb=pos_emb)
        else:
            h = self.self_attn(query=h, key=h, value=h, mask=att_mask)
        residual = add(residual, h, 1.0)
        residual = add(residual, self.conv(self.norm_conv(residual), pad_mask=pad_mask), 1.0)
        residual = add(residual, self.feed_forward2(self.norm_feed_forward2(residual)), self.fc_factor)
        return self.norm_out(residual)


def lean_layer_(layer: torch.nn.Module) -> None:
    """In place: a NeMo ``ConformerLayer`` and its ``ConformerFeedForward`` modules become the lean classes (exact
    types only: a subclass keeps its own forward)."""
    if type(layer) is ConformerLayer:
        layer.__class__ = LeanConformerLayer
    for name in ("feed_forward1", "feed_forward2"):
        ff = getattr(layer, name, None)
        if type(ff) is ConformerFeedForward:
            ff.__class__ = LeanConformerFeedForward
