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
- dropout is not called in eval mode, where it is the identity;
- CPU inference pads an FFN hidden layer of unaligned width with zero units (``LeanConformerFeedForward``):
  within float rounding, not bit for bit.

Streaming caches, adapters and NeMo's tensor access (``register_accessible_tensor``) take NeMo's forward.
``GroupNormConformerEncoder`` gives these classes to its blocks (``encoder.lean_modules_``); they have no state of
their own (the padded FFN weights are a kept copy, not state), so checkpoints and NeMo's ``isinstance`` checks are
unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nemo.collections.asr.parts.submodules.conformer_modules import ConformerFeedForward, ConformerLayer
from torch import nn

from nemo_layerfx.encoder.conv import activate
from nemo_layerfx.encoder.inference import KeptInferenceWeights, inference_cache


class LeanConformerFeedForward(KeptInferenceWeights, ConformerFeedForward):
    """NeMo's FFN; without gradients a Swish activation runs in place on the first projection's fresh output.

    CPU inference pads a hidden layer whose width is not a multiple of 8 (a pruned or federated-dropout FFN) with
    zero units: a matrix product whose output rows are not 32-byte aligned is slower on a CPU (a batch of eight
    9-s utterances, 410 hidden units: the FFN 8.3 -> 7.3 ms as 416, timed ad hoc), and a zero unit adds exact zeros
    (its second-layer column is zero): within float rounding, not bit for bit. The padded weights are a copy, kept
    between inference calls (``inference_cache``): inference holds such an FFN's weights twice. Plain ``nn.Linear``
    layers with biases only (gated and low-rank FFNs keep their path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1, l2 = self.linear1, self.linear2
        if (l1.out_features % 8 and not torch.is_grad_enabled() and not self.training and x.device.type == "cpu"
                and x.dtype == torch.float32 and type(l1) is nn.Linear and type(l2) is nn.Linear
                and l1.bias is not None):
            w1, b1, w2 = inference_cache(self, lambda: aligned_hidden(l1, l2))
            return F.linear(activate(self.activation, F.linear(x, w1, b1)), w2, l2.bias)
        x = activate(self.activation, l1(x))
        if self.training:
            x = self.dropout(x)
        return self.linear2(x)


def aligned_hidden(linear1: nn.Linear, linear2: nn.Linear, multiple: int = 8) -> tuple[torch.Tensor, ...]:
    """An FFN's weights with its hidden layer padded by zero units to a multiple of ``multiple``: (W1, b1, W2)."""
    pad = -linear1.out_features % multiple
    w1, b1, w2 = linear1.weight, linear1.bias, linear2.weight
    return F.pad(w1, (0, 0, 0, pad)), F.pad(b1, (0, pad)), F.pad(w2, (0, pad))


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
