"""The valid-frame GroupNorm as two Triton kernels: one for the forward, one for the backward.

Why: on a GPU a small Conformer step is bound by kernel launches, and the reference ``_MaskedGroupNormFn`` (in
``conv.py``) runs about eight kernels forward and a dozen backward where cuDNN's BatchNorm runs one each. Here one
program per (utterance, group) reads the group's valid frames, takes mean and variance (two passes, float32),
writes the normalized output (zeros on padding) and keeps mean and 1/std for the backward, which is one more
program per (utterance, group) plus one sum over the batch for the affine gradients.

It computes what the reference computes (tested to 1e-5, forward and gradients, every group count and padding
pattern, per-layer widths, float16/bfloat16 inputs with float32 statistics). ``MaskedGroupNorm`` uses it on CUDA
tensors when Triton is installed (it comes with PyTorch's CUDA wheels); elsewhere the reference runs. Control it
with ``LAYERFX_FUSED_GN=auto|on|off`` or ``fused_group_norm("off")``: ``on`` also runs it on CPU tensors through
Triton's interpreter (slow; that is how the tests check the kernels on machines without a GPU).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs nothing more
    triton = None

MODES = ("auto", "on", "off")
_mode = os.environ.get("LAYERFX_FUSED_GN", "auto")
if _mode not in MODES:
    raise ValueError(f"LAYERFX_FUSED_GN must be one of {MODES}, got {_mode!r}")


@contextlib.contextmanager
def fused_group_norm(mode: str) -> Iterator[None]:
    """Choose the GroupNorm path inside the block: 'auto' (fused on CUDA), 'on' (fused everywhere), 'off'."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"fused_group_norm mode must be one of {MODES}, got {mode!r}")
    if mode == "on" and triton is None:
        raise RuntimeError("fused_group_norm('on') needs Triton (pip install triton); it is not installed")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


_failed: str | None = None  # why the kernels failed on this machine: 'auto' then takes the reference path


def use_fused(x: torch.Tensor) -> bool:
    """Whether ``MaskedGroupNorm`` should take the fused path for this input."""
    return triton is not None and (_mode == "on" or (_mode == "auto" and x.is_cuda and _failed is None))


def fall_back(error: Exception) -> None:
    """A kernel failed to compile or launch here (a Triton, driver or GPU it does not support): in 'auto' mode the
    reference GroupNorm takes over for the rest of the process, with one warning, instead of failing training;
    in 'on' mode (asked for explicitly) the error stands."""
    global _failed
    if _mode == "on":
        raise error
    if _failed is None:
        _failed = f"{type(error).__name__}: {error}"
        warnings.warn(f"the fused GroupNorm kernels failed on this machine ({_failed}); the reference GroupNorm "
                      "computes the same from now on (LAYERFX_FUSED_GN=off chooses it from the start)",
                      RuntimeWarning, stacklevel=3)


def _forward_kernel(X, PAD, W, BIAS, Y, MEAN, RSTD, C, T, Cg, G, eps,
                    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # one program per (utterance b, group g); X, Y: (B, C, T) contiguous; PAD: (B, T) bool, True on padding
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    base = b * C * T + g * Cg * T
    total = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    frames = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok_t = (t < T) & (tl.load(PAD + b * T + t, mask=t < T, other=1) == 0)
        frames += ok_t.to(tl.float32)
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < Cg)[:, None] & ok_t[None, :]
            total += tl.load(X + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
    n = tl.maximum(tl.sum(frames, axis=0) * Cg, 1.0)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / n
    sq = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok_t = (t < T) & (tl.load(PAD + b * T + t, mask=t < T, other=1) == 0)
        for c0 in range(0, Cg, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = (c < Cg)[:, None] & ok_t[None, :]
            x = tl.load(X + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, x - mean, 0.0)
            sq += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(sq, axis=1), axis=0) / n + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0)
        bias = tl.load(BIAS + g * Cg + c, mask=c < Cg, other=0.0)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok_t = (t < T) & (tl.load(PAD + b * T + t, mask=t < T, other=1) == 0)
            inside = (c < Cg)[:, None] & (t < T)[None, :]
            ok = (c < Cg)[:, None] & ok_t[None, :]
            x = tl.load(X + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.where(ok, (x - mean) * rstd * w[:, None] + bias[:, None], 0.0)
            tl.store(Y + base + c[:, None] * T + t[None, :], y.to(Y.dtype.element_ty), mask=inside)


def _backward_kernel(X, DY, PAD, W, MEAN, RSTD, DX, DWB, B, C, T, Cg, G,
                     BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) on valid frames, 0 on padding;
    # DWB: (2, B, C) per-utterance partial sums of dy * xhat (weight) and dy (bias), summed over B outside
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    base = b * C * T + g * Cg * T
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    s_dxhat = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    s_dxhat_xhat = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    frames = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        frames += ((t < T) & (tl.load(PAD + b * T + t, mask=t < T, other=1) == 0)).to(tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok_t = (t < T) & (tl.load(PAD + b * T + t, mask=t < T, other=1) == 0)
            ok = (c < Cg)[:, None] & ok_t[None, :]
            x = tl.load(X + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
            xhat = tl.where(ok, (x - mean) * rstd, 0.0)
            dxhat = dy * w[:, None]
            s_dxhat += dxhat
            s_dxhat_xhat += dxhat * xhat
            dw += tl.sum(dy * xhat, axis=1)
            db += tl.sum(dy, axis=1)
        tl.store(DWB + b * C + g * Cg + c, dw, mask=c < Cg)
        tl.store(DWB + B * C + b * C + g * Cg + c, db, mask=c < Cg)
    n = tl.maximum(tl.sum(frames, axis=0) * Cg, 1.0)
    m1 = tl.sum(tl.sum(s_dxhat, axis=1), axis=0) / n
    m2 = tl.sum(tl.sum(s_dxhat_xhat, axis=1), axis=0) / n
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(W + g * Cg + c, mask=c < Cg, other=0.0)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok_t = (t < T) & (tl.load(PAD + b * T + t, mask=t < T, other=1) == 0)
            inside = (c < Cg)[:, None] & (t < T)[None, :]
            ok = (c < Cg)[:, None] & ok_t[None, :]
            x = tl.load(X + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + c[:, None] * T + t[None, :], mask=ok, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dx = tl.where(ok, (dy * w[:, None] - m1 - xhat * m2) * rstd, 0.0)
            tl.store(DX + base + c[:, None] * T + t[None, :], dx.to(DX.dtype.element_ty), mask=inside)


_compiled: tuple = ()


def _kernels() -> tuple:
    """The two kernels, compiled on first use (run by Triton's interpreter when TRITON_INTERPRET=1)."""
    global _compiled
    if not _compiled:
        _compiled = (triton.jit(_forward_kernel), triton.jit(_backward_kernel))
    return _compiled


def interpreting() -> bool:
    """Whether Triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors, in numpy)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _blocks(Cg: int, T: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(Cg), 16)
    return block_c, max(16, min(triton.next_power_of_2(T), 2048 // block_c))


class _FusedMaskedGroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pad_mask, weight, bias, num_groups: int, eps: float):
        B, C, T = x.shape
        G, Cg = num_groups, C // num_groups
        x, pad_mask = x.contiguous(), pad_mask.contiguous()
        y = torch.empty_like(x)
        mean = torch.empty(B * G, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_c, block_t = _blocks(Cg, T)
        _kernels()[0][(B * G,)](x, pad_mask, weight, bias, y, mean, rstd, C, T, Cg, G, eps,
                                             BLOCK_C=block_c, BLOCK_T=block_t)
        ctx.save_for_backward(x, pad_mask, weight, mean, rstd)
        ctx.num_groups, ctx.eps = G, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, pad_mask, weight, mean, rstd = ctx.saved_tensors
        B, C, T = x.shape
        G, Cg = ctx.num_groups, C // ctx.num_groups
        dx = torch.empty_like(x)
        dwb = torch.empty(2, B, C, device=x.device, dtype=torch.float32)
        try:
            block_c, block_t = _blocks(Cg, T)
            _kernels()[1][(B * G,)](x, dy.contiguous(), pad_mask, weight, mean, rstd, dx, dwb, B, C, T,
                                                 Cg, G, BLOCK_C=block_c, BLOCK_T=block_t)
        except Exception as e:  # the backward kernel compiles at the first backward: it can fail there alone
            fall_back(e)
            return (*reference_grads(x, pad_mask, weight, G, ctx.eps, dy), None, None)
        dw, db = dwb.sum(dim=1)
        return dx, None, dw, db, None, None


# (dx, None, dweight, dbias) of the reference GroupNorm, for a backward kernel that fails here; conv.py, which holds
# the reference, sets it when imported (it imports this module, so this one cannot import it back)
reference_grads = None


def masked_group_norm(x: torch.Tensor, pad_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      num_groups: int, eps: float) -> torch.Tensor:
    """GroupNorm of x (B, C, T) over each group's valid frames (pad_mask (B, T), True on padding); padded frames
    come out as zeros. Output and input gradient in x's dtype, statistics and weight gradients in float32."""
    if triton is None:
        raise RuntimeError("the fused GroupNorm needs Triton (pip install triton); it is not installed")
    if x.dim() != 3 or pad_mask.shape != (x.shape[0], x.shape[2]) or x.shape[1] % num_groups:
        raise ValueError(f"expected x (B, C, T) with C divisible by {num_groups} and pad_mask (B, T); got "
                         f"{tuple(x.shape)} and {tuple(pad_mask.shape)}")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(f"the fused GroupNorm runs on CUDA tensors (got {x.device}); on the CPU only through "
                           f"Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported)")
    return _FusedMaskedGroupNormFn.apply(x, pad_mask.bool(), weight.float().contiguous(),
                                         bias.float().contiguous(), num_groups, float(eps))
