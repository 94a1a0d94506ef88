"""Our encoder's attention: NeMo's relative-position attention with a leaner score path, and multi-head attention
whose heads have their own query/key and value widths (a pruned layer's attention).

Pruning removes query/key dimensions and value dimensions of each head independently (Kubo et al.), so a pruned
layer's heads differ in width. ``RaggedMultiHeadAttention`` computes what NeMo's ``RelPositionMultiHeadAttention``
(or, without ``linear_pos``, ``MultiHeadAttention``) computes for full-width heads, head by head, with the scores
still scaled by the *original* head width (the pruned dimensions contributed exactly zero, so the scale must not
change).

Parameters keep NeMo's names: ``linear_q/k`` (Σ qk rows), ``linear_v`` (Σ v rows), ``linear_out`` (Σ v columns),
``linear_pos`` (Σ qk rows) and ``pos_bias_u/v`` stored flat (Σ qk,), head after head.

Shape notation: B batch, T1 query frames, T2 key frames, P = 2 T1 - 1 relative positions, D d_model.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from nemo.collections.asr.parts.submodules.multi_head_attention import INF_VAL, RelPositionMultiHeadAttention
from nemo.utils import avoid_float16_autocast_context
from torch import nn

from nemo_layerfx.encoder.inference import KeptInferenceWeights, inference_cache


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
    if torch.jit.is_tracing():  # strides are recorded as constants, shapes are not: take them from a contiguous x's
        if p == 2 * t1 - 1 and x.is_contiguous():
            return x.as_strided((b, h, t1, t1), (h * t1 * p, t1 * p, p - 1, 1), x.storage_offset() + t1 - 1)
    elif p == 2 * t1 - 1 and x.stride(-1) == 1 and x.stride(-2) == p:
        return x.as_strided((b, h, t1, t1), (x.stride(0), x.stride(1), p - 1, 1), x.storage_offset() + t1 - 1)
    x = torch.nn.functional.pad(x, pad=(1, 0)).view(b, h, -1, t1)
    return x[:, :, 1:].view(b, h, t1, p)


def rel_scores(q_u: torch.Tensor, q_v: torch.Tensor, k: torch.Tensor, p: torch.Tensor, s_d_k: float
               ) -> torch.Tensor:
    """NeMo's relative-position scores ((q + u) kᵀ + shift((q + v) pᵀ)) / √d_k, computed in place: (B, H, T1, d)
    queries with the content bias u and the position bias v added, (B, H, T2, d) keys, (1, H, P, d) positions ->
    (B, H, T1, T2). The same operations in NeMo's order, so the same numbers bit for bit, without allocating a new
    (B, H, T1, T2) tensor for the sum and the scale."""
    bd = rel_shift(q_v @ p.transpose(-2, -1))[..., : k.size(-2)]
    return (q_u @ k.transpose(-2, -1)).add_(bd).div_(s_d_k)


def attend(scores: torch.Tensor, mask: torch.Tensor | None, dropout: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v with NeMo's masking: (B, H, T1, T2) scores, (B, T1, T2) mask (True: not allowed), (B, H, T2,
    d_v) values -> (B, H, T1, d_v). Masked scores are set to -INF_VAL before the softmax and the masked weights to 0
    after it, as NeMo's ``forward_attention`` does, bit for bit.

    ``scores`` is overwritten: the caller hands over a fresh tensor. Writing in place saves allocating a new
    (B, H, T1, T2) tensor per step, which on a CPU costs more than the arithmetic on long utterances (fresh pages);
    the weights are masked in place too when no gradient is recorded (softmax's backward needs its output). CPU
    inference masks by addition instead (``additive_mask``): the same numbers, a fraction of the time."""
    if mask is None:
        return dropout(torch.softmax(scores, dim=-1)) @ v
    if not torch.is_grad_enabled() and scores.device.type == "cpu":
        bias, keep = additive_mask(mask, scores.dtype)
        out = dropout(torch.softmax(scores.add_(bias), dim=-1)) @ v
        return out if keep is None else out.mul_(keep)
    mask = mask.unsqueeze(1)  # (B, 1, T1, T2)
    attn = torch.softmax(scores.masked_fill_(mask, -INF_VAL), dim=-1)
    attn = attn.masked_fill(mask, 0.0) if torch.is_grad_enabled() else attn.masked_fill_(mask, 0.0)
    return dropout(attn) @ v


_ADDITIVE: dict[str, tuple] = {}  # the latest mask's additive form, kept while that mask tensor lives


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T1, T2) attention mask (True: not allowed) -> (B, 1, T1, T2) scores to add (-INF_VAL where masked, 0
    elsewhere) and (B, 1, T1, 1) query rows to keep (0 for a row with no allowed key), or None when every row has one.

    Why: on a CPU, ``masked_fill_`` with a mask broadcast over the heads is a slow kernel (16 layers, 4 heads, a batch
    of eight 9-s utterances: 2.35 ms per call against 0.17 ms for the addition; NeMo calls it twice per layer). The
    results are NeMo's bit for bit: in a row with an allowed key the masked scores end at least INF_VAL below its
    maximum, so their weights underflow to exactly 0 either way and the allowed weights are computed from the same
    numbers; a row with none (a padded query frame) gets NeMo's zero output. Every layer of a forward receives the
    same mask tensor, so the conversion is kept (for that tensor, while it lives and is not written to) and made
    once per forward."""
    version = -1 if mask.is_inference() else mask._version  # inference_mode tensors keep no version
    kept = _ADDITIVE.get("mask")
    if kept is not None and kept[0]() is mask and kept[1] == (version, dtype):
        return kept[2]
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -INF_VAL).unsqueeze(1)
    empty = mask.all(dim=-1)  # (B, T1): no allowed key
    # (a traced graph must not depend on this batch's padding)
    keep = (~empty).to(dtype)[:, None, :, None] if torch.jit.is_tracing() or bool(empty.any()) else None
    _ADDITIVE["mask"] = (weakref.ref(mask, lambda _: _ADDITIVE.clear()), (version, dtype), (bias, keep))
    return bias, keep


def fused_self_projection(x: torch.Tensor, fused: tuple[torch.Tensor, torch.Tensor, torch.Tensor], heads: int,
                          qk: int, v: int) -> tuple[torch.Tensor, ...]:
    """Self-attention's projections of x (B, T, D) as one matrix product (inference). ``fused`` (``fuse_weights``):
    the query, key and value weights stacked, their biases with the position bias u added to the query's, and
    v - u. Returns q + u, q + v, k, each (B, H, T, qk), and v (B, H, T, v).

    One product and one addition instead of three products and two additions: on short utterances a pruned block
    pays these per-call costs, not the arithmetic. The position biases are folded into the query bias, so the sums
    round differently from NeMo's (q + b) + u: within float rounding, not bit for bit. CPU only (the path our GPU
    timings were taken on stays as it was); the stacked weight is a copy, kept while the parameters do not change:
    inference holds the query, key and value weights twice."""
    weight, bias, v_minus_u = fused
    n = heads * qk
    q_u, k, val = (t.unflatten(-1, (heads, width)).transpose(1, 2) for t, width in
                   zip(F.linear(x, weight, bias).split([n, n, heads * v], dim=-1), (qk, qk, v)))
    return q_u, q_u + v_minus_u, k, val


def fuse_weights(wq, bq, u, w, wk, bk, wv, bv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_self_projection``'s stacked weight, bias and v - u (u, w: the position biases, (H, qk))."""
    return torch.cat([wq, wk, wv]), torch.cat([bq + u.flatten(), bk, bv]), (w - u).unsqueeze(1)


class LeanRelPositionMultiHeadAttention(KeptInferenceWeights, RelPositionMultiHeadAttention):
    """NeMo's relative-position attention, the same parameters and the same numbers, with a leaner score path.

    The scores are computed in place (``rel_scores``, then ``attend``) and the shift is the view ``rel_shift``; NeMo
    allocates a new (B, H, T1, T2) tensor at each step, which on long utterances costs a CPU more than the arithmetic.
    Outputs and gradients are bit-identical to NeMo's forward (a test checks it). CPU self-attention without gradients
    projects once (``fused_self_projection``; plain ``nn.Linear`` projections only, not gated or low-rank ones),
    within float rounding of NeMo. A streaming cache or
    ``use_pytorch_sdpa`` takes NeMo's forward. ``GroupNormConformerEncoder`` gives this class to every one of its
    ``RelPositionMultiHeadAttention`` modules (``encoder.lean_modules_``): it has no state of its own, so checkpoints
    and NeMo's ``isinstance`` checks are unchanged.
    """

    rel_shift = staticmethod(rel_shift)  # also for NeMo's forward, which the streaming and SDPA paths take

    def forward(self, query, key, value, mask, pos_emb, cache=None):
        if cache is not None or self.use_pytorch_sdpa:
            return super().forward(query, key, value, mask, pos_emb, cache=cache)
        if torch.is_autocast_enabled():
            query, key, value = query.to(torch.float32), key.to(torch.float32), value.to(torch.float32)
        with avoid_float16_autocast_context():
            b = query.size(0)
            projections = (self.linear_q, self.linear_k, self.linear_v)
            if (query is key is value and not torch.is_grad_enabled() and query.dtype == torch.float32
                    and query.device.type == "cpu"
                    and all(type(m) is nn.Linear and m.bias is not None for m in projections)):
                fused = inference_cache(self, lambda: fuse_weights(
                    self.linear_q.weight, self.linear_q.bias, self.pos_bias_u, self.pos_bias_v,
                    self.linear_k.weight, self.linear_k.bias, self.linear_v.weight, self.linear_v.bias))
                q_u, q_v, k, v = fused_self_projection(query, fused, self.h, self.d_k, self.d_k)
                p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
                out = attend(rel_scores(q_u, q_v, k, p, self.s_d_k), mask, self.dropout, v)  # (B, H, T1, d_k)
                return self.linear_out(out.transpose(1, 2).reshape(b, -1, self.h * self.d_k))
            q = self.linear_q(query).view(b, -1, self.h, self.d_k)  # (B, T1, H, d_k)
            k = self.linear_k(key).view(b, -1, self.h, self.d_k).transpose(1, 2)  # (B, H, T2, d_k)
            v = self.linear_v(value).view(b, -1, self.h, self.d_k).transpose(1, 2)
            p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)  # (1, H, P, d_k)
            scores = rel_scores((q + self.pos_bias_u).transpose(1, 2), (q + self.pos_bias_v).transpose(1, 2), k, p,
                                self.s_d_k)  # (B, H, T1, T2)
            out = attend(scores, mask, self.dropout, v)  # (B, H, T1, d_k)
            return self.linear_out(out.transpose(1, 2).reshape(b, -1, self.h * self.d_k))


class RaggedMultiHeadAttention(KeptInferenceWeights, nn.Module):
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
        # CPU inference pads the values further, to a multiple of 8: a matrix product whose output rows are not
        # 32-byte aligned is slower on a CPU (the attention-weighted sum of eight 9-s utterances, 4 heads: 2.16 ms
        # for 29-wide heads against 1.36 ms for 32), and the zero dimensions add exact zeros
        self.cpu_v = -(-self.max_v // 8) * 8
        # Where each head's dimensions sit when every head is padded to the widest: index nq / nv is a zero row
        self.register_buffer("qk_index", self._padded_index(self.qk_dims, self.max_qk), persistent=False)
        self.register_buffer("v_index", self._padded_index(self.v_dims, self.max_v), persistent=False)
        self.register_buffer("cpu_v_index", self._padded_index(self.v_dims, self.cpu_v), persistent=False)

    @staticmethod
    def _padded_index(dims: list[int], width: int) -> torch.Tensor | None:
        """(H * widest,) the source row of every padded head dimension (``sum(dims)``: a zero), or None when every
        head has the widest width (nothing to pad)."""
        if all(d == width for d in dims):
            return None
        zero, start, index = sum(dims), 0, []
        for d in dims:
            index += list(range(start, start + d)) + [zero] * (width - d)
            start += d
        return torch.tensor(index, dtype=torch.long)

    @staticmethod
    def _pad_rows(t: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
        """A weight's rows (or a bias's entries) laid out for heads padded to the widest, the padding zeros.

        Padding the weights, not the activations: the projections then come out already padded, one (H x widest)
        view serves one batched matmul for all heads, and the padding adds exact zeros to every dot product. The
        weights are far smaller than the activations they would otherwise copy head by head (and stay small on
        long utterances), and autograd carries the gradient back to the kept rows."""
        if t is None or index is None:
            return t
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])]).index_select(0, index)

    def _padded_weights(self) -> dict[str, torch.Tensor | None]:
        """Every projection's weight and bias, and the position biases, padded per head (``_pad_rows``); the output
        projection's weight with its columns padded like the values.

        Without gradients (inference) they are computed once and kept until a parameter changes
        (``inference_cache``), so a pruned model's inference pays nothing for the padding, and the self-attention
        projections are also stacked for ``fused_self_projection`` ("qkv"); with gradients enabled they are
        recomputed every forward, so that autograd reaches the parameters."""
        if not torch.is_grad_enabled():
            return inference_cache(self, self._build_padded_weights)
        return self._build_padded_weights()

    def _build_padded_weights(self) -> dict[str, torch.Tensor | None]:
        fused = (not torch.is_grad_enabled() and self.rel_pos and self.linear_q.weight.device.type == "cpu"
                 and all(getattr(self, f"linear_{n}").bias is not None for n in "qkv"))
        qk, v = self.qk_index, self.cpu_v_index if fused else self.v_index
        out = {}
        for name, index in (("q", qk), ("k", qk), ("v", v)) + ((("pos", qk),) if self.rel_pos else ()):
            linear = getattr(self, f"linear_{name}")
            out[name] = (self._pad_rows(linear.weight, index), self._pad_rows(linear.bias, index))
        if self.rel_pos:
            out["u"] = self._pad_rows(self.pos_bias_u, qk).view(self.h, 1, self.max_qk)
            out["w"] = self._pad_rows(self.pos_bias_v, qk).view(self.h, 1, self.max_qk)
        weight = self.linear_out.weight  # (D, Σ v)
        out["out"] = weight if v is None else self._pad_rows(weight.t(), v).t().contiguous()
        if fused:
            out["qkv"] = fuse_weights(*out["q"], out["u"].squeeze(1), out["w"].squeeze(1), *out["k"], *out["v"])
        return out

    def _project(self, weights: tuple, x: torch.Tensor, width: int) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, widest): a projection's heads, each zero-padded to the widest."""
        return F.linear(x, *weights).unflatten(-1, (self.h, width)).transpose(1, 2)

    def forward(self, query, key, value, mask, pos_emb=None, cache=None):
        """query/key/value (B, T, D); mask (B, T1, T2) True where attention is not allowed; pos_emb (1, P, D)."""
        if cache is not None:
            raise NotImplementedError("per-head-width attention does not support cache-aware streaming")
        if torch.is_autocast_enabled():
            query, key, value = query.to(torch.float32), key.to(torch.float32), value.to(torch.float32)
        with avoid_float16_autocast_context():
            pw = self._padded_weights()
            if ("qkv" in pw and query is key is value and query.dtype == torch.float32
                    and query.device.type == "cpu"):  # CPU inference, self-attention
                p = self._project(pw["pos"], pos_emb, self.max_qk)  # (1, H, P, widest qk)
                q_u, q_w, k, v = fused_self_projection(query, pw["qkv"], self.h, self.max_qk, self.cpu_v)
                out = attend(rel_scores(q_u, q_w, k, p, self.s_d_k), mask, self.dropout, v)
                return F.linear(out.transpose(1, 2).flatten(2), pw["out"], self.linear_out.bias)  # (B, T1, D)
            q = self._project(pw["q"], query, self.max_qk)  # (B, H, T1, widest qk)
            k = self._project(pw["k"], key, self.max_qk)  # (B, H, T2, widest qk)
            v = self._project(pw["v"], value, pw["out"].size(1) // self.h)  # (B, H, T2, widest v)
            if self.rel_pos:
                p = self._project(pw["pos"], pos_emb, self.max_qk)  # (1, H, P, widest qk)
                u, w = pw["u"], pw["w"]  # (H, 1, widest qk)
                scores = rel_scores(q + u, q + w, k, p, self.s_d_k)  # (B, H, T1, T2)
            else:
                scores = (q @ k.transpose(-2, -1)).div_(self.s_d_k)
            out = attend(scores, mask, self.dropout, v).transpose(1, 2).flatten(2)  # (B, T1, H x widest v)
            return F.linear(out, pw["out"], self.linear_out.bias)  # (B, T1, D)
