"""GroupNormConformerEncoder: padding exactness, NeMo parity, per-layer widths, config errors."""

from __future__ import annotations

import pytest
import torch

import nemo_layerfx  # noqa: F401  (registers the plugin)
from nemo.collections.asr.modules import ConformerEncoder
from nemo_layerfx.encoder.conv import MaskedGroupNorm
from nemo_layerfx.encoder import GroupNormConformerEncoder

SMALL = dict(feat_in=80, n_layers=2, d_model=64, n_heads=4, conv_kernel_size=15, subsampling="dw_striding",
             subsampling_factor=4, dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)


def build(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**{**SMALL, "conv_norm_type": "group_norm8", **kw})


def drift(enc, train: bool, pad: int = 200) -> tuple[float, float]:
    """Max |diff| on A's valid frames: A alone vs A zero-padded, and A alone vs A in a batch with a longer B."""
    enc.train(train)
    torch.manual_seed(1)
    a, b = torch.randn(1, 80, 200), torch.randn(1, 80, 200 + pad)
    alone, n = enc(audio_signal=a, length=torch.tensor([200]))
    padded_a = torch.cat([a, torch.zeros(1, 80, pad)], dim=2)
    padded, _ = enc(audio_signal=padded_a, length=torch.tensor([200]))
    batch, _ = enc(audio_signal=torch.cat([padded_a, b]), length=torch.tensor([200, 200 + pad]))
    n = int(n[0])
    return ((alone[0, :, :n] - padded[0, :, :n]).abs().max().item(),
            (alone[0, :, :n] - batch[0, :, :n]).abs().max().item())


@pytest.mark.unit
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pad", [40, 600])
def test_padding_invariance_ours_vs_nemo_group_norm(train, pad):
    ours = drift(build(GroupNormConformerEncoder), train, pad)
    assert max(ours) <= 1e-5, f"GroupNormConformerEncoder drifts with padding: {ours}"
    nemo = drift(build(ConformerEncoder), train, pad)
    assert min(nemo) > 1e-2, f"NeMo's group_norm8 was expected to leak padding, drift {nemo}"


@pytest.mark.unit
def test_masked_group_norm_matches_group_norm_on_valid_frames():
    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 16, 50)
    lengths = [50, 31, 7]
    pad_mask = torch.arange(50)[None, :] >= torch.tensor(lengths)[:, None]
    y = norm(x, pad_mask)
    for i, n in enumerate(lengths):
        ref = torch.nn.functional.group_norm(x[i:i + 1, :, :n], 4, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(y[i:i + 1, :, :n], ref, atol=1e-5, rtol=1e-5)
        assert torch.all(y[i, :, n:] == 0)
    assert torch.allclose(norm(x), torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps))


@pytest.mark.unit
def test_masked_group_norm_gradient_is_exact():
    """The hand-written backward against finite differences (float64), padding included."""
    from nemo_layerfx.encoder.conv import _MaskedGroupNormFn

    torch.manual_seed(0)
    x = torch.randn(3, 8, 11, dtype=torch.double, requires_grad=True)
    w = torch.randn(8, dtype=torch.double, requires_grad=True)
    b = torch.randn(8, dtype=torch.double, requires_grad=True)
    valid = (torch.arange(11)[None] < torch.tensor([11, 7, 3])[:, None]).double().unsqueeze(1)
    k = 11 / valid.sum(dim=2)
    assert torch.autograd.gradcheck(lambda x, w, b: _MaskedGroupNormFn.apply(x, valid, k, w, b, 2, 1e-5), (x, w, b))


@pytest.mark.unit
def test_masked_group_norm_inference_path_equals_the_training_path():
    """Without gradients the norm skips autograd's bookkeeping (``conv._masked_group_norm``) and reuses the
    valid-frame counts of the last mask (``valid_frames``): the same numbers bit for bit, and a mask changed in place
    or a new mask is not answered from the kept counts."""
    from nemo_layerfx.encoder.conv import valid_frames

    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 16, 50)
    pad = torch.arange(50)[None, :] >= torch.tensor([50, 31, 7])[:, None]
    trained = norm(x.clone().requires_grad_(), pad)
    assert trained.grad_fn is not None
    with torch.no_grad():
        inferred = norm(x, pad)
    assert torch.equal(trained.detach(), inferred)
    assert valid_frames(pad) is valid_frames(pad)
    pad[1, 20:] = True  # the same tensor, changed in place: counts taken afresh
    with torch.no_grad():
        changed = norm(x, pad)
    assert torch.all(changed[1, :, 20:] == 0) and not torch.equal(changed[1], inferred[1])
    ref = torch.nn.functional.group_norm(x[1:2, :, :20], 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(changed[1:2, :, :20], ref, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # as NeMo's transcribe runs: inference tensors carry no version counter
        assert torch.equal(norm(x, pad.clone()), changed)


@pytest.mark.unit
@pytest.mark.parametrize("context", [None, [4, 0], [1, 3]])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_module_time_major_inference_matches_the_training_path(context, affine):
    """CPU inference runs the conv module time-major (channels-last depthwise convolution, GroupNorm over (B, T, G,
    C/G) views): the training path's outputs within float rounding, for symmetric and causal (asymmetric) contexts
    and a norm without affine parameters; padded frames still do not leak into the valid ones."""
    from nemo_layerfx.encoder.conv import MaskedConformerConvolution

    torch.manual_seed(0)
    conv = MaskedConformerConvolution(d_model=24, kernel_size=5, num_groups=4, channels=16, conv_context_size=context)
    if affine:
        torch.nn.init.normal_(conv.batch_norm.weight)
        torch.nn.init.normal_(conv.batch_norm.bias)
    else:
        conv.batch_norm = MaskedGroupNorm(4, 16, affine=False)
    h = torch.randn(3, 50, 24)
    pad = torch.arange(50)[None, :] >= torch.tensor([50, 31, 7])[:, None]
    with torch.no_grad():
        inferred = conv(h, pad)
        garbage = h.clone()
        garbage[pad] = 1e3  # other values on the padded frames: the valid frames' outputs are unchanged
        again = conv(garbage, pad)
    trained = conv(h.clone().requires_grad_(), pad)
    assert trained.grad_fn is not None
    assert not torch.equal(inferred, trained.detach())  # another summation order: the time-major path was taken
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(again[~pad], inferred[~pad])


@pytest.mark.unit
def test_pointwise_conv_as_a_matrix_product_equals_the_convolution():
    """``conv.pointwise`` (a GEMM on a CPU) computes the kernel-1 Conv1d's outputs and gradients, so the conv module's
    pointwise convs keep their Conv1d weights, names and meaning (checkpoints, the unit map, gates, low rank)."""
    from nemo_layerfx.encoder.conv import pointwise

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(24, 40, 1)
    x = torch.randn(3, 24, 17, requires_grad=True)
    ours = pointwise(x, conv.weight, conv.bias)
    ref = conv(x)
    assert ours.shape == ref.shape == (3, 40, 17)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((ours * g).sum(), (x, conv.weight, conv.bias))
    ref_grads = torch.autograd.grad((ref * g).sum(), (x, conv.weight, conv.bias))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("subsampling", ["striding", "dw_striding"])
def test_lean_front_end_matches_nemos(subsampling):
    """The front end without NeMo's redundant masking passes gives NeMo's outputs, lengths and gradients exactly in
    training, on a padded batch; in CPU inference (masks in place, convolutions channels-last) the same lengths and
    outputs within float rounding, padded frames still exactly zero before the output projection."""
    from nemo.collections.asr.parts.submodules.subsampling import MaskedConvSequential

    from nemo_layerfx.encoder.subsampling import LeanMaskedConvSequential

    enc = build(GroupNormConformerEncoder, subsampling=subsampling)
    assert type(enc.pre_encode.conv) is LeanMaskedConvSequential
    feats, lengths = torch.randn(3, 90, 80), torch.tensor([90, 61, 17])

    def run():
        enc.zero_grad(set_to_none=True)
        out, out_len = enc.pre_encode(x=feats, lengths=lengths)
        out.sin().sum().backward()
        with torch.no_grad():
            inference = enc.pre_encode(x=feats, lengths=lengths)[0]
        return out.detach(), out_len, [p.grad.clone() for p in enc.pre_encode.parameters()], inference

    ours = run()
    with torch.no_grad():
        conv_out, conv_len = enc.pre_encode.conv(feats, lengths)
    enc.pre_encode.conv.__class__ = MaskedConvSequential
    ref = run()
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], ref[2]))
    assert not torch.equal(ours[3], ref[3])  # another summation order: if this is equal, channels-last was not taken
    torch.testing.assert_close(ours[3], ref[3], rtol=1e-5, atol=1e-6)
    assert conv_out.is_contiguous(memory_format=torch.channels_last)
    assert torch.all(conv_out[1, :, int(conv_len[1]):] == 0) and torch.all(conv_out[2, :, int(conv_len[2]):] == 0)


@pytest.mark.unit
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lean_blocks_match_nemos_bit_for_bit(dropout):
    """Every block is the lean one (one operator per residual update, in place in inference, in-place Swish in the
    FFN); the encoder's outputs and gradients in training (dropout drawn in NeMo's order) and its inference outputs
    equal those of NeMo's own block and FFN forwards, bit for bit, on a padded batch; the block's input is not
    written."""
    from nemo.collections.asr.parts.submodules.conformer_modules import ConformerFeedForward, ConformerLayer

    from nemo_layerfx.encoder.layer import LeanConformerFeedForward, LeanConformerLayer

    enc = build(GroupNormConformerEncoder, dropout=dropout, dropout_att=dropout, ff_hidden=[[48, 0], 64])
    assert all(type(layer) is LeanConformerLayer and type(layer.feed_forward1) is LeanConformerFeedForward
               for layer in enc.layers)
    feats, lengths = torch.randn(3, 80, 90), torch.tensor([90, 61, 17])

    def run():
        enc.train().zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out, out_len = enc(audio_signal=feats, length=lengths)
        (out.sin() * (torch.arange(out.shape[-1]) < out_len[:, None, None])).sum().backward()
        with torch.no_grad():
            inference = enc.eval()(audio_signal=feats, length=lengths)[0]
            x = torch.randn(3, 23, enc.d_model)
            before = x.clone()
            block = enc.layers[1](x, pad_mask=torch.zeros(3, 23, dtype=torch.bool), pos_emb=enc.pos_enc(x)[1],
                                  att_mask=torch.zeros(3, 23, 23, dtype=torch.bool))
        assert torch.equal(x, before)
        return out.detach(), [p.grad.clone() for p in enc.parameters()], inference, block

    ours = run()
    for layer in enc.layers:
        layer.__class__ = ConformerLayer
        layer.feed_forward1.__class__ = layer.feed_forward2.__class__ = ConformerFeedForward
    ref = run()
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[2], ref[2]) and torch.equal(ours[3], ref[3])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], ref[1]))


@pytest.mark.unit
def test_state_dict_moves_both_ways_with_nemo_group_norm():
    ours, stock = build(GroupNormConformerEncoder, seed=3), build(ConformerEncoder, seed=4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    ours.load_state_dict(stock.state_dict(), strict=True)
    x, n = torch.randn(1, 80, 160), torch.tensor([160])
    for enc in (ours, stock):
        enc.eval()
    torch.testing.assert_close(ours(audio_signal=x, length=n)[0], stock(audio_signal=x, length=n)[0])
    stock2 = build(ConformerEncoder, seed=5).eval()
    stock2.load_state_dict(build(GroupNormConformerEncoder, seed=6).state_dict(), strict=True)


@pytest.mark.unit
@pytest.mark.parametrize("norm, match", [
    ("group_norm5", "5 groups do not divide the 64 conv channels"),
    ("group_norm", "needs conv_norm_type='group_norm<G>'"),
    ("groupnorm8", "needs conv_norm_type='group_norm<G>'"),
    ("group_norm0", "needs conv_norm_type='group_norm<G>'"),
])
def test_bad_group_spec_is_a_clear_error(norm, match):
    with pytest.raises(ValueError, match=match):
        build(GroupNormConformerEncoder, conv_norm_type=norm)


@pytest.mark.unit
def test_a_pretrained_models_own_norm_is_kept_as_nemo_builds_it():
    from nemo.collections.asr.parts.submodules.conformer_modules import ConformerConvolution

    from nemo.collections.asr.modules import ConformerEncoder

    ours = build(GroupNormConformerEncoder, conv_norm_type="batch_norm")
    stock = build(ConformerEncoder, conv_norm_type="batch_norm")
    assert all(type(layer.conv) is ConformerConvolution for layer in ours.layers)
    assert isinstance(ours.layers[0].conv.batch_norm, torch.nn.BatchNorm1d)
    assert ours.load_state_dict(stock.state_dict(), strict=True)  # the same tensors, running statistics included
    with pytest.raises(ValueError, match="conv_channels / conv_groups need a group_norm<G> conv norm"):
        build(GroupNormConformerEncoder, conv_norm_type="batch_norm", conv_channels=[16, 64])


@pytest.mark.unit
def test_per_layer_widths():
    enc = build(GroupNormConformerEncoder, ff_hidden=[128, [32, 64]], layer_n_heads=[2, 4], conv_channels=[16, 64])
    sd = enc.state_dict()
    assert sd["layers.0.feed_forward1.linear1.weight"].shape == (128, 64)
    assert sd["layers.1.feed_forward1.linear1.weight"].shape == (32, 64)
    assert sd["layers.1.feed_forward2.linear2.weight"].shape == (64, 64)
    assert sd["layers.0.self_attn.linear_q.weight"].shape == (32, 64)  # 2 heads x d_k 16
    assert sd["layers.0.self_attn.linear_out.weight"].shape == (64, 32)
    assert sd["layers.0.self_attn.pos_bias_u"].shape == (2, 16)
    assert sd["layers.0.conv.pointwise_conv1.weight"].shape == (32, 64, 1)  # GLU pairs of 16 channels
    assert sd["layers.0.conv.batch_norm.weight"].shape == (16,)
    assert sd["layers.1.self_attn.linear_q.weight"].shape == (64, 64)
    out, n = enc(audio_signal=torch.randn(2, 80, 120), length=torch.tensor([120, 70]))
    assert out.shape == (2, 64, 30) and n.tolist() == [30, 18]
    out.sum().backward()
    # the slimmed model is still padding-exact
    assert max(drift(enc, train=False, pad=100)) <= 1e-5


@pytest.mark.unit
@pytest.mark.parametrize("kw, match", [
    (dict(ff_hidden=[128]), "ff_hidden has 1 entries but the encoder has n_layers=2"),
    (dict(conv_channels=[12, 64]), "8 groups do not divide the 12 conv channels"),
    (dict(layer_n_heads=[0, 4]), r"layer_n_heads\[0\] must be >= 1"),
    (dict(ff_hidden=[0, 64]), "ff_hidden entries must be a positive int"),
])
def test_bad_widths_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        build(GroupNormConformerEncoder, **kw)


@pytest.mark.unit
def test_cache_aware_streaming_is_rejected():
    enc = build(GroupNormConformerEncoder)
    with pytest.raises(NotImplementedError, match="cache-aware streaming"):
        enc.get_initial_cache_state(batch_size=1)
    with pytest.raises(NotImplementedError, match="cache-aware streaming"):
        enc.layers[0].conv(torch.randn(1, 10, 64), cache=torch.zeros(1, 64, 14))


@pytest.mark.unit
def test_registration_is_idempotent_and_adapters_register():
    from nemo.core.classes import common
    from nemo.core.classes.mixins import adapter_mixins

    nemo_layerfx.register()
    nemo_layerfx.register()
    assert common.ALLOWED_TARGET_PREFIXES.count("nemo_layerfx.") == 1
    meta = adapter_mixins.get_registered_adapter(GroupNormConformerEncoder)
    assert meta is not None and meta.adapter_class.__name__ == "GroupNormConformerEncoderAdapter"


@pytest.mark.unit
def test_from_config_dict_through_nemo_allow_list():
    from nemo.core.classes.common import Serialization

    enc = Serialization.from_config_dict({"_target_": "nemo_layerfx.encoder.GroupNormConformerEncoder",
                                          **SMALL, "conv_norm_type": "group_norm4"})
    assert isinstance(enc, GroupNormConformerEncoder) and enc.num_groups == 4


@pytest.mark.unit
def test_bf16_autocast_keeps_float32_statistics():
    enc = build(GroupNormConformerEncoder).eval()
    x, n = torch.randn(2, 80, 160), torch.tensor([160, 90])
    ref, _ = enc(audio_signal=x, length=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = enc(audio_signal=x, length=n)
    assert torch.isfinite(low).all()
    assert (low.float()[0] - ref[0]).abs().mean() < 0.05 * ref[0].abs().mean()


@pytest.mark.unit
def test_an_extension_sets_the_training_depth_and_wraps_every_forward():
    """The public extension point capabilities plug into (depth sampling, adaptive-dropout gates): the core calls
    it without knowing which capability it is."""
    from nemo_layerfx.encoder import EncoderExtension

    class Probe(EncoderExtension):
        def __init__(self):
            self.calls = []

        def training_depth(self, encoder):
            return 1

        def before_forward(self, encoder):
            self.calls.append(("before", encoder.training))

        def after_forward(self, encoder):
            self.calls.append(("after", encoder.training))

    enc = build(GroupNormConformerEncoder, n_layers=3)
    ran = []
    for layer in enc.layers:
        layer.register_forward_hook(lambda m, i, o: ran.append(m))
    ext = Probe()
    enc.add_extension("probe", ext)
    with pytest.raises(ValueError, match="already has a 'probe' extension"):
        enc.add_extension("probe", Probe())
    x, n = torch.randn(2, 80, 64), torch.tensor([64, 40])
    enc.train()
    enc(audio_signal=x, length=n)
    assert len(ran) == 1 and ext.calls == [("before", True), ("after", True)]
    enc.eval()
    del ran[:]
    enc(audio_signal=x, length=n)
    assert len(ran) == 3 and ext.calls[-2:] == [("before", False), ("after", False)]  # eval: every layer
    enc.remove_extension("probe")
    assert enc.extension("probe") is None


@pytest.mark.unit
def test_share_and_unshare_are_inverse_and_keep_the_outputs():
    enc = build(GroupNormConformerEncoder, n_layers=4).eval()
    x, n = torch.randn(2, 80, 64), torch.tensor([64, 40])
    enc.share_(2)
    assert enc.share_layers == 2 and enc.layers[0] is enc.layers[1] and enc.layers[1] is not enc.layers[2]
    shared, _ = enc(audio_signal=x, length=n)
    enc.unshare_()
    assert enc.share_layers is None and len({id(m) for m in enc.layers}) == 4
    assert not any(k.startswith("layer_sets.") for k in enc.state_dict())
    torch.testing.assert_close(enc(audio_signal=x, length=n)[0], shared, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nothing to unshare"):
        enc.unshare_()
