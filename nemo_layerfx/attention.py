"""Multi-head attention whose heads have their own query/key and value widths (a pruned layer's attention).

Pruning removes query/key dimensions and value dimensions of each head independently (Kubo et al.), so a pruned
layer's heads differ in width. This module computes what NeMo's ``RelPositionMultiHeadAttention`` (or, without
``linear_pos``, ``MultiHeadAttention``) computes for full-width heads, head by head, with the scores still scaled
by the *original* head width (the pruned dimensions contributed exactly zero, so the scale must not change).

Parameters keep NeMo's names: ``linear_q/k`` (Σ qk rows), ``linear_v`` (Σ v rows), ``linear_out`` (Σ v columns),
``linear_pos`` (Σ qk rows) and ``pos_bias_u/v`` stored flat (Σ qk,), head after head.

Shape notation: B batch, T1 query frames, T2 key frames, P = 2 T1 - 1 relative positions, D d_model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from nemo.collections.asr.parts.submodules.multi_head_attention import INF_VAL
from nemo.utils import avoid_float16_autocast_context
from torch import nn


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """NeMo's relative shift: (B, H, T1, P) scores by relative position -> (B, H, T1, T1) by absolute key position.

    Score (i, j) is x[i, j + T1 - 1 - i] when P = 2 T1 - 1 (the positions run from T1 - 1 down to 1 - T1), so each
    row is the one above it moved one place left: a strided view of x. NeMo's ``rel_shift`` pads x with a column of
    zeros and re-views it, which copies the whole (B, H, T1, P) tensor forward and fills and copies it again
    backward; the view gives the same values and gradients bit for bit without those copies (CPU, 16 layers,
    d_model 256, a batch of eight 9-s utterances: the training step 0.87x as long; no change at 1-2 s). Other shapes
    (a streaming cache, P != 2 T1 - 1) take NeMo's padded route; callers slice ``[..., :T2]`` either way. Bound on
    every relative-position attention of ``GroupNormConformerEncoder``.
    """
    b, h, t1, p = x.shape
    if p == 2 * t1 - 1 and x.stride(-1) == 1 and x.stride(-2) == p:
        return x.as_strided((b, h, t1, t1), (x.stride(0), x.stride(1), p - 1, 1), x.storage_offset() + t1 - 1)
    x = torch.nn.functional.pad(x, pad=(1, 0)).view(b, h, -1, t1)
    return x[:, :, 1:].view(b, h, t1, p)


class RaggedMultiHeadAttention(nn.Module):
    """Heads of widths ``qk_dims[h]`` (queries, keys, positions) and ``v_dims[h]`` (values)."""

    def __init__(self, d_model: int, qk_dims: Sequence[int], v_dims: Sequence[int], head_dim: int,
                 dropout_rate: float, rel_pos: bool = True, use_bias: bool = True):
        super().__init__()
        if len(qk_dims) != len(v_dims) or not qk_dims:
            raise ValueError(f"per-head widths need one query/key and one value width per head, got {qk_dims}, "
                             f"{v_dims}")
        if min(qk_dims) < 0 or min(v_dims) < 0:
            raise ValueError(f"per-head widths must be >= 0, got {qk_dims}, {v_dims}")
        # A head of query/key width 0 scores every key 0 (uniform attention over the valid keys), one of value width 0
        # contributes nothing: what a gated head whose dimensions are all masked computes.
        self.qk_dims, self.v_dims = [int(d) for d in qk_dims], [int(d) for d in v_dims]
        self.h, self.d_k = len(self.qk_dims), int(head_dim)  # d_k: the original head width (scores' scale)
        self.s_d_k = math.sqrt(self.d_k)
        nq, nv = sum(self.qk_dims), sum(self.v_dims)
        self.linear_q = nn.Linear(d_model, nq, bias=use_bias)
        self.linear_k = nn.Linear(d_model, nq, bias=use_bias)
        self.linear_v = nn.Linear(d_model, nv, bias=use_bias)
        self.linear_out = nn.Linear(nv, d_model, bias=use_bias)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.rel_pos = rel_pos
        if rel_pos:
            self.linear_pos = nn.Linear(d_model, nq, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(nq))
            self.pos_bias_v = nn.Parameter(torch.zeros(nq))
        self.max_qk, self.max_v = max(self.qk_dims), max(self.v_dims)

    def _pad(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """(..., T, Σ dims) -> (..., H, T, widest): every head's dimensions, zero-padded, so that one batched matmul
        serves all heads (the padding adds exact zeros to every dot product). Heads are contiguous slices, so this is
        H strided copies (a view when every head has the same width), not an indexed scatter, which costs far more
        on CPU."""
        dims, width = (self.qk_dims, self.max_qk) if kind == "qk" else (self.v_dims, self.max_v)
        if all(d == width for d in dims):
            return x.unflatten(-1, (self.h, width)).transpose(-3, -2)
        out = x.new_zeros(*x.shape[:-1], self.h, width)
        start = 0
        for h, d in enumerate(dims):
            out[..., h, :d] = x[..., start:start + d]
            start += d
        return out.transpose(-3, -2)

    def _unpad(self, out: torch.Tensor) -> torch.Tensor:
        """(B, T, H, widest v) -> (B, T, Σ v): the inverse of ``_pad`` for the attention output."""
        if all(d == self.max_v for d in self.v_dims):
            return out.flatten(-2)
        return torch.cat([out[..., h, :d] for h, d in enumerate(self.v_dims)], dim=-1)

    rel_shift = staticmethod(rel_shift)

    def forward(self, query, key, value, mask, pos_emb=None, cache=None):
        """query/key/value (B, T, D); mask (B, T1, T2) True where attention is not allowed; pos_emb (1, P, D)."""
        if cache is not None:
            raise NotImplementedError("per-head-width attention does not support cache-aware streaming")
        if torch.is_autocast_enabled():
            query, key, value = query.to(torch.float32), key.to(torch.float32), value.to(torch.float32)
        with avoid_float16_autocast_context():
            q = self._pad(self.linear_q(query), "qk")  # (B, H, T1, widest qk)
            k = self._pad(self.linear_k(key), "qk")  # (B, H, T2, widest qk)
            v = self._pad(self.linear_v(value), "v")  # (B, H, T2, widest v)
            if self.rel_pos:
                p = self._pad(self.linear_pos(pos_emb), "qk")  # (1, H, P, widest qk)
                u = self._pad(self.pos_bias_u.unsqueeze(0), "qk").squeeze(-2)  # (H, widest qk)
                w = self._pad(self.pos_bias_v.unsqueeze(0), "qk").squeeze(-2)
                ac = (q + u.unsqueeze(1)) @ k.transpose(-2, -1)  # (B, H, T1, T2)
                bd = self.rel_shift((q + w.unsqueeze(1)) @ p.transpose(-2, -1))[:, :, :, : ac.size(-1)]
                scores = (ac + bd) / self.s_d_k
            else:
                scores = q @ k.transpose(-2, -1) / self.s_d_k
            if mask is not None:
                mask = mask.unsqueeze(1)  # (B, 1, T1, T2)
                scores = scores.masked_fill(mask, -INF_VAL)
                attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
            else:
                attn = torch.softmax(scores, dim=-1)
            attn = self.dropout(attn)  # (B, H, T1, T2)
            out = (attn @ v).transpose(1, 2)  # (B, T1, H, widest v)
            return self.linear_out(self._unpad(out))  # (B, T1, Σ v) -> (B, T1, D)
