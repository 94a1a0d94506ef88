"""The fused GroupNorm kernels against the reference ``_MaskedGroupNormFn``.

Run by ``tests/test_fused_gn.py`` in a subprocess: natively on CUDA where there is one, else on the CPU through
Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is imported, hence the subprocess).
"""

from __future__ import annotations

import pytest
import torch

from nemo_layerfx.encoder import fused_gn
from nemo_layerfx.encoder.conv import _MaskedGroupNormFn, valid_frames

DEVICE = "cuda" if torch.cuda.is_available() and not fused_gn.interpreting() else "cpu"
if DEVICE == "cpu" and not fused_gn.interpreting():
    pytest.exit("no CUDA and TRITON_INTERPRET is not set: nothing can run the kernels", returncode=3)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# (channels, groups, lengths): the group counts and padding patterns of tests/test_encoder.py, odd group sizes
# (Cg 5, 3), an utterance with no valid frame, one frame, and more channels than one block of the kernel holds
CASES = [
    (16, 4, [50, 31, 7]), (8, 2, [11, 7, 3]), (20, 4, [37, 0]), (12, 3, [9]), (15, 5, [64, 1, 40]),
    (64, 8, [130, 100, 3, 64]), (64, 1, [70, 70]), (256, 8, [40, 23]), (96, 2, [300, 257]),
]


def both(x, pad, w, b, groups, dtype=torch.float32):
    """Fused and reference outputs and (dx, dw, db) for one upstream gradient."""
    x = x.to(DEVICE, dtype).requires_grad_()
    w, b, pad = w.to(DEVICE).requires_grad_(), b.to(DEVICE).requires_grad_(), pad.to(DEVICE)
    y = fused_gn.masked_group_norm(x, pad, w, b, groups, 1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    got = (y, *torch.autograd.grad(y, (x, w, b), g))
    valid, k = valid_frames(pad)
    y_ref = _MaskedGroupNormFn.apply(x.float(), valid, k, w, b, groups, 1e-5).to(dtype)  # as MaskedGroupNorm does
    ref = (y_ref, *torch.autograd.grad(y_ref, (x, w, b), g))
    return got, ref


def inputs(channels, lengths, seed=0):
    torch.manual_seed(seed)
    T = max(lengths)
    x = torch.randn(len(lengths), channels, T) * 3 + 1
    pad = torch.arange(T)[None] >= torch.tensor(lengths)[:, None]
    return x, pad, torch.randn(channels), torch.randn(channels)


@pytest.mark.parametrize("channels, groups, lengths", CASES)
def test_float32_forward_and_gradients_match_the_reference(channels, groups, lengths):
    x, pad, w, b = inputs(channels, lengths)
    got, ref = both(x, pad, w, b, groups)
    for name, a, r in zip(("y", "dx", "dweight", "dbias"), got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert torch.all(got[0].masked_select(pad.to(DEVICE).unsqueeze(1)) == 0), "padded frames must come out as 0"
    assert torch.all(got[1].masked_select(pad.to(DEVICE).unsqueeze(1)) == 0), "padded frames get no gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_statistics(dtype):
    """Under autocast the depthwise conv hands the norm fp16/bf16: statistics and weight gradients stay float32,
    outputs and dx come back in the input's dtype (same rounding as the reference's cast)."""
    x, pad, w, b = inputs(64, [130, 100, 3, 64])
    got, ref = both(x, pad, w, b, 8, dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    tol = 1e-2 if dtype == torch.float16 else 8e-2
    for name, a, r in zip(("y", "dx", "dweight", "dbias"), got, ref):
        torch.testing.assert_close(a.float(), r.float(), atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_whole_encoder_with_per_layer_widths_matches_the_reference_path():
    """A GroupNormConformerEncoder with per-layer conv widths, forward and backward, fused vs reference."""
    import nemo_layerfx  # noqa: F401
    from nemo_layerfx.encoder import GroupNormConformerEncoder

    torch.manual_seed(0)
    enc = GroupNormConformerEncoder(feat_in=80, n_layers=2, d_model=64, n_heads=4, conv_kernel_size=15,
                                    subsampling="dw_striding", subsampling_factor=4, dropout=0.0,
                                    dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0,
                                    conv_norm_type="group_norm8", conv_channels=[16, 64]).to(DEVICE)
    x, n = torch.randn(3, 80, 120, device=DEVICE), torch.tensor([120, 70, 33], device=DEVICE)
    outs, paths = {}, []
    for layer in enc.layers:
        layer.conv.batch_norm.register_forward_hook(lambda m, i, o: paths.append(type(o.grad_fn).__name__))
    for mode in ("on", "off"):
        enc.zero_grad()
        with fused_gn.fused_group_norm(mode):
            out, _ = enc(audio_signal=x, length=n)
        out.square().sum().backward()
        outs[mode] = (out.detach(), {k: p.grad.clone() for k, p in enc.named_parameters()})
    assert paths == ["_FusedMaskedGroupNormFnBackward"] * 2 + ["_MaskedGroupNormFnBackward"] * 2, paths
    torch.testing.assert_close(outs["on"][0], outs["off"][0], atol=1e-5, rtol=1e-5)
    for k, g in outs["off"][1].items():
        torch.testing.assert_close(outs["on"][1][k], g, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_fused_path_is_padding_exact():
    from nemo_layerfx.encoder.conv import MaskedGroupNorm

    norm = MaskedGroupNorm(4, 16).to(DEVICE)
    x, pad, _, _ = inputs(16, [50, 31])
    x = x.to(DEVICE)
    with fused_gn.fused_group_norm("on"):
        alone = norm(x[1:, :, :31], torch.zeros(1, 31, dtype=torch.bool, device=DEVICE))
        batched = norm(x, pad.to(DEVICE))
    assert type(batched.grad_fn).__name__ == "_FusedMaskedGroupNormFnBackward"
    torch.testing.assert_close(batched[1:, :, :31], alone, atol=1e-5, rtol=1e-5)
