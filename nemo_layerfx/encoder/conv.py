"""The Conformer conv module with a GroupNorm that ignores padded frames (the core of the padding-exact encoder).

NeMo's ``group_normG`` normalizes over the whole padded time axis; ``MaskedGroupNorm`` takes each group's statistics
from the valid frames only, with an analytic backward (``_MaskedGroupNormFn``, the reference and the CPU path) so
training stays as fast as NeMo's; on CUDA the same maths runs as two Triton kernels (``fused_gn.py``).

In CPU inference the conv module runs time-major (``MaskedConformerConvolution._time_major``): every tensor stays
(B, T, C) as the block's residual stream is, the depthwise convolution is oneDNN's channels-last one and the masked
GroupNorm reduces (B, T, G, C/G) views. NeMo's layout transposes to (B, C, T) and back, pads a copy for the depthwise
convolution, and oneDNN's (B, C, T) depthwise kernel has a fixed cost per call that a pruned (narrow) module pays in
full. Within float rounding of the training path (another summation order), padded frames still exact zeros.

Shape notation: B batch, T frames, D d_model, C conv channels, G groups.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from nemo.collections.asr.parts.submodules.causal_convs import CausalConv1D
from nemo.collections.asr.parts.utils.activations import Swish
from torch import nn

import nemo_layerfx.encoder.fused_gn as fused_gn

STOCK_ENCODER_TARGET = "nemo.collections.asr.modules.ConformerEncoder"
_GROUP_NORM = re.compile(r"^group_norm(\d+)$")


def parse_num_groups(conv_norm_type: str) -> int:
    """Read G from NeMo's ``group_norm<G>`` spelling; anything else is a config error."""
    m = _GROUP_NORM.match(str(conv_norm_type))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            f"GroupNormConformerEncoder needs conv_norm_type='group_norm<G>' with G >= 1 (e.g. 'group_norm8'), "
            f"got {conv_norm_type!r}; a pretrained model's batch_norm, layer_norm, instance_norm or fused_batch_norm "
            f"is kept as NeMo builds it."
        )
    return int(m.group(1))


def valid_frames(pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (B, 1, T) float32, 1 on valid frames; k (B, 1) = T / valid frames) of a (B, T) pad mask.

    Every conv module of an encoder forward gets the same mask tensor, so the last answer is kept (keyed on the
    tensor itself and its version, held until the next mask): 16 layers compute it once, not 16 times. (Tensors
    made under ``torch.inference_mode`` keep no version; the encoder makes a new mask every forward.)"""
    version = -1 if pad_mask.is_inference() else pad_mask._version
    kept = _VALID_FRAMES[0]
    if kept is not None and kept[0] is pad_mask and kept[1] == version:
        return kept[2]
    valid = (~pad_mask).float().unsqueeze(1)
    counts = (valid, pad_mask.shape[1] / valid.sum(dim=2).clamp_min(1.0))  # k: (B, 1)
    _VALID_FRAMES[0] = (pad_mask, version, counts)
    return counts


_VALID_FRAMES: list = [None]  # (mask, version, (valid, k)) of the last mask valid_frames saw


def _valid_stats(groups: torch.Tensor, dims: tuple[int, ...], k: torch.Tensor, one_minus_k: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) of ``groups`` over ``dims`` (kept as size 1) and over the valid frames only: the padded frames of
    ``groups`` are zeros, and k (broadcastable to the result) is T / valid frames of each utterance.

    The statistics over the whole padded group rescaled to the valid frames: with zeros on padding,
    mean_valid = k mean_all and E_valid[x²] = k E_all[x²], so var_valid = k (var_all + (1 - k) mean_all²). var_all is
    taken in two passes (the mean, then the mean squared deviation): as accurate as ``torch.var_mean``, whose CPU
    kernel is slow on a conv module's small groups (d_model 256, 25 frames, 2 threads, timed ad hoc: 21 µs against
    220 µs). Both layouts use it: (B, G, C/G x T) in training, time-major (B, T, G, C/G) in CPU inference."""
    mean_all = groups.mean(dim=dims, keepdim=True)
    var_all = (groups - mean_all).square_().mean(dim=dims, keepdim=True)
    rstd = torch.addcmul(var_all, mean_all.square(), one_minus_k).mul_(k).clamp_min_(0.0).add_(eps).rsqrt_()
    return mean_all.mul_(k), rstd


def _masked_group_norm(x, valid, k, weight, bias, num_groups: int, eps: float):
    """(y, xm, mean, rstd): the valid-frame GroupNorm of x (B, C, T), and what its backward needs.

    Called directly when no gradient is recorded (inference): a conv module's norm is a dozen small ops, and on short
    utterances their per-call cost, not the arithmetic, is what a pruned model still pays in full, so autograd's
    bookkeeping is skipped."""
    B, C, T = x.shape
    G, Cg = num_groups, C // num_groups
    xm = x * valid  # (B, C, T), padded frames -> 0
    k = k.unsqueeze(2)  # (B, 1, 1)
    mean, rstd = _valid_stats(xm.view(B, G, -1), (2,), k, 1.0 - k, eps)  # each (B, G, 1)
    scale = rstd * weight.view(1, G, Cg)  # (B, G, Cg)
    shift = torch.addcmul(bias.view(1, G, Cg), mean, scale, value=-1.0)  # b - mean * scale
    y = torch.addcmul(shift.view(B, C, 1), xm, scale.view(B, C, 1)).mul_(valid)  # padded frames -> 0
    return y, xm, mean, rstd


def _time_major_frames(pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``valid_frames`` laid out for time-major (B, T, G, C/G) tensors: (valid (B, T, 1, 1), k and 1 - k, each
    (B, 1, 1, 1)); kept like ``valid_frames``' answer, so the 16 conv modules of a forward share it."""
    kept = _TIME_MAJOR[0]
    valid, k = valid_frames(pad_mask)
    if kept is not None and kept[0] is valid:
        return kept[1]
    b = valid.shape[0]
    k = k.view(b, 1, 1, 1)
    out = (valid.view(b, -1, 1, 1), k, 1.0 - k)
    _TIME_MAJOR[0] = (valid, out)
    return out


_TIME_MAJOR: list = [None]  # (valid tensor of valid_frames, its time-major views)


def masked_group_norm_time_major(x: torch.Tensor, pad_mask: torch.Tensor, norm: "MaskedGroupNorm") -> torch.Tensor:
    """``norm(x, pad_mask)`` for a time-major x (B, T, C) that the caller hands over (it is overwritten): the
    valid-frame GroupNorm of ``_masked_group_norm`` (the same statistics, ``_valid_stats``),
    without gradients, reducing (B, T, G, C/G) views instead of transposing to (B, C, T)."""
    B, T, C = x.shape
    G = norm.num_groups
    valid, k, one_minus_k = _time_major_frames(pad_mask)
    groups = x.view(B, T, G, C // G).mul_(valid)  # padded frames -> 0
    mean, rstd = _valid_stats(groups, (1, 3), k, one_minus_k, norm.eps)  # each (B, 1, G, 1)
    scale = rstd * norm.weight.view(1, 1, G, -1) if norm.affine else rstd.expand(B, 1, G, C // G)
    bias = norm.bias.view(1, 1, G, -1) if norm.affine else x.new_zeros(1, 1, G, C // G)
    shift = torch.addcmul(bias, mean, scale, value=-1.0)  # b - mean * scale, (B, 1, G, C/G)
    return torch.addcmul(shift, groups, scale).mul_(valid).view(B, T, C)


class _MaskedGroupNormFn(torch.autograd.Function):
    """Valid-frame GroupNorm with a hand-written backward.

    Fewer, larger ops than the autograd chain of the same maths: small Conformer steps on a GPU are bound by
    launching kernels (H100, d_model 256 x 16 layers: encoder step 1.19x -> 1.13x of BatchNorm's).
    """

    @staticmethod
    def forward(ctx, x, valid, k, weight, bias, num_groups: int, eps: float):
        y, xm, mean, rstd = _masked_group_norm(x, valid, k, weight, bias, num_groups, eps)
        ctx.save_for_backward(xm, valid, k, weight, mean, rstd)
        ctx.num_groups = num_groups
        return y

    @staticmethod
    def backward(ctx, dy):
        xm, valid, k, weight, mean, rstd = ctx.saved_tensors
        B, C, T = xm.shape
        G, Cg = ctx.num_groups, C // ctx.num_groups
        dy = (dy * valid).view(B, G, Cg, T)  # padded outputs are constant zeros
        xhat = ((xm.view(B, G, Cg, T) - mean.view(B, G, 1, 1)) * rstd.view(B, G, 1, 1)) * valid.view(B, 1, 1, T)
        dxhat = dy * weight.view(1, G, Cg, 1)
        n = (T * Cg / k).view(B, 1, 1, 1)  # valid elements per group
        mean_dxhat = dxhat.sum(dim=(2, 3), keepdim=True) / n
        mean_dxhat_xhat = (dxhat * xhat).sum(dim=(2, 3), keepdim=True) / n
        dx = (dxhat - mean_dxhat - xhat * mean_dxhat_xhat) * rstd.view(B, G, 1, 1) * valid.view(B, 1, 1, T)
        dweight = (dy * xhat).sum(dim=(0, 3)).reshape(C)
        dbias = dy.sum(dim=(0, 3)).reshape(C)
        return dx.view(B, C, T), None, None, dweight, dbias, None, None


def _reference_grads(x, pad_mask, weight, num_groups: int, eps: float, dy) -> tuple:
    """(dx, None, dweight, dbias) by the reference GroupNorm's own backward (the bias does not enter them): what
    the fused backward falls back to when its kernel fails on a machine."""
    valid, k = valid_frames(pad_mask)
    with torch.enable_grad():
        xr, wr = x.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
        br = torch.zeros_like(wr, requires_grad=True)
        y = _MaskedGroupNormFn.apply(xr, valid, k, wr, br, num_groups, eps)
        dx, dw, db = torch.autograd.grad(y, (xr, wr, br), dy.float())
    return dx.to(x.dtype), None, dw, db


fused_gn.reference_grads = _reference_grads


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm over (channels in group x valid frames): padded frames do not enter the statistics and
    come out as zeros."""

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, T); pad_mask: (B, T), True on padded frames. Returns (B, C, T)."""
        if pad_mask is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if fused_gn.use_fused(x):  # CUDA: two Triton kernels instead of ~20 (fused_gn.py)
            try:
                return fused_gn.masked_group_norm(
                    x, pad_mask, self.weight if self.affine else torch.ones_like(x[0, :, 0]),
                    self.bias if self.affine else torch.zeros_like(x[0, :, 0]), self.num_groups, self.eps)
            except Exception as e:  # a kernel that does not compile or launch here: the reference, warned once
                fused_gn.fall_back(e)
        # statistics in float32 also under fp16/bf16 autocast, as F.group_norm does
        valid, k = valid_frames(pad_mask)
        weight = self.weight.float() if self.affine else x.new_ones(x.shape[1], dtype=torch.float32)
        bias = self.bias.float() if self.affine else x.new_zeros(x.shape[1], dtype=torch.float32)
        args = (x.float(), valid, k, weight, bias, self.num_groups, self.eps)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
            y = _MaskedGroupNormFn.apply(*args)
        else:
            y = _masked_group_norm(*args)[0]
        return y.to(x.dtype)


def activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``activation(x)`` for an ``x`` the caller just made and no longer needs: without gradients a NeMo ``Swish``
    (SiLU) overwrites it instead of allocating a new tensor (the conv module's norm output, the FFN's first
    projection); with gradients, or any other activation, the module runs as usual."""
    if torch.is_grad_enabled() or type(activation) is not Swish:
        return activation(x)
    return F.silu(x, inplace=True)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel-1 ``Conv1d`` (``weight`` (C_out, C_in, 1)) on x (B, C_in, T) -> (B, C_out, T).

    On a CPU it runs as one matrix product over the channels (the result a transposed view of a contiguous
    (B, T, C_out) tensor): the same products, without oneDNN's per-call convolution set-up, which dominates on the
    short sequences a Conformer sees after subsampling, and most on narrow (pruned) conv modules. Elsewhere (CUDA)
    it stays a convolution, the path our GPU timings were taken on."""
    if x.device.type != "cpu":
        return F.conv1d(x, weight, bias)
    return F.linear(x.transpose(1, 2), weight.squeeze(-1), bias).transpose(1, 2)


def _pointwise_time_major(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``_pointwise_call`` for a time-major x (B, T, C_in) -> (B, T, C_out): a plain ``nn.Conv1d`` is one linear
    map; a wrapper (a gate, a low-rank factorization) runs its own forward on the (B, C_in, T) view."""
    if type(module) is nn.Conv1d:
        return F.linear(x, module.weight.squeeze(-1), module.bias)
    return module(x.transpose(1, 2)).transpose(1, 2)


def _pointwise_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a pointwise conv module: a plain ``nn.Conv1d`` takes ``pointwise``; a wrapper (a gate, a
    low-rank factorization) runs its own forward."""
    if type(module) is nn.Conv1d:
        return pointwise(x, module.weight, module.bias)
    return module(x)


class MaskedConformerConvolution(nn.Module):
    """Conformer conv module (pointwise -> GLU -> depthwise -> masked GroupNorm -> Swish -> pointwise).

    Same parameter names as NeMo's ``ConformerConvolution`` (the norm stays under ``batch_norm``), but with
    ``channels`` inner channels (NeMo: always d_model) so slimmed models are expressible.
    """

    def __init__(
        self,
        d_model: int,
        kernel_size: int,
        num_groups: int,
        channels: int | None = None,
        conv_context_size: Any = None,
        use_bias: bool = True,
    ):
        super().__init__()
        channels = d_model if channels is None else channels
        if (kernel_size - 1) % 2 != 0:
            raise ValueError(f"conv_kernel_size must be odd, got {kernel_size}")
        if num_groups < 1 or channels < 1 or channels % num_groups != 0:
            raise ValueError(
                f"conv_norm_type='group_norm{num_groups}': {num_groups} groups do not divide the {channels} conv "
                f"channels; choose G dividing {channels}"
            )
        self.d_model, self.channels, self.kernel_size = d_model, channels, kernel_size
        if conv_context_size is None:
            conv_context_size = (kernel_size - 1) // 2
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * channels, kernel_size=1, bias=use_bias)
        self.depthwise_conv = CausalConv1D(
            channels, channels, kernel_size=kernel_size, stride=1, padding=conv_context_size, groups=channels,
            bias=use_bias,
        )
        self.batch_norm = MaskedGroupNorm(num_groups=num_groups, num_channels=channels)  # NeMo's name, for ckpts
        self.activation = Swish()
        self.pointwise_conv2 = nn.Conv1d(channels, d_model, kernel_size=1, bias=use_bias)

    @property
    def norm(self) -> MaskedGroupNorm:
        """The GroupNorm (NeMo calls the attribute ``batch_norm`` whatever the norm is)."""
        return self.batch_norm

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """x: (B, T, D); pad_mask: (B, T), True on padding. Returns (B, T, D)."""
        if cache is not None:
            raise NotImplementedError(
                "cache-aware streaming is not supported by GroupNormConformerEncoder: its GroupNorm statistics "
                "span the whole utterance, which a streaming chunk cannot see. Use NeMo's ConformerEncoder with "
                "conv_norm_type='layer_norm' for cache-aware streaming."
            )
        if (pad_mask is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and type(self.batch_norm) is MaskedGroupNorm):
            return self._time_major(x, pad_mask)
        x = _pointwise_call(self.pointwise_conv1, x.transpose(1, 2))  # (B, 2C, T)
        x = F.glu(x, dim=1)  # (B, C, T), a new tensor (GLU's backward needs only its input): masked in place
        if pad_mask is not None:
            x = x.masked_fill_(pad_mask.unsqueeze(1), 0.0)
        x = self.depthwise_conv(x)
        x = self.batch_norm(x, pad_mask)
        x = activate(self.activation, x)  # the norm's output is new: in inference Swish overwrites it
        x = _pointwise_call(self.pointwise_conv2, x)  # (B, D, T)
        return x.transpose(1, 2)

    def _time_major(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """CPU inference, every tensor (B, T, C) (module doc): x (B, T, D) -> (B, T, D)."""
        x = F.glu(_pointwise_time_major(self.pointwise_conv1, x), dim=-1)  # (B, T, C), new: masked in place
        x = x.masked_fill_(pad_mask.unsqueeze(-1), 0.0)
        conv = self.depthwise_conv
        left, right = conv._left_padding, conv._right_padding
        x = x.transpose(1, 2).unsqueeze(2)  # (B, C, 1, T) stored channels-last
        if left != right:
            x = F.pad(x, (left, right)).contiguous(memory_format=torch.channels_last)
        x = F.conv2d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, left) if left == right else 0,
                     groups=conv.groups)  # (B, C, 1, T), channels-last
        x = masked_group_norm_time_major(x.squeeze(2).transpose(1, 2), pad_mask, self.batch_norm)  # (B, T, C)
        x = activate(self.activation, x)
        return _pointwise_time_major(self.pointwise_conv2, x)
