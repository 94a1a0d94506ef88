"""Per-head-width attention computes what NeMo's attention computes when the removed dimensions are zero.

The pruned model's exactness rests on this module; these cases pin it directly: heads of different widths, a head
whose query/key (or value) width is 0, equal widths (the view fast path), padded batches, and gradients.
"""

import pytest
import torch
from nemo.collections.asr.parts.submodules.multi_head_attention import (
    RelPositionMultiHeadAttention,
    RelPositionalEncoding,
)

from nemo_layerfx.encoder.attention import LeanRelPositionMultiHeadAttention, RaggedMultiHeadAttention, rel_shift
from nemo_layerfx.encoder import GroupNormConformerEncoder

D, H = 32, 4
DK = D // H


def _pair(qk_dims, v_dims, seed=0):
    """NeMo's attention with random weights whose removed dimensions are zeroed, and the ragged module holding
    only the kept dimensions (the first ``qk_dims[h]`` / ``v_dims[h]`` of head h)."""
    torch.manual_seed(seed)
    ref = RelPositionMultiHeadAttention(H, D, 0.0, None, None).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    keep_qk = torch.cat([torch.arange(d) + h * DK for h, d in enumerate(qk_dims)])
    keep_v = torch.cat([torch.arange(d) + h * DK for h, d in enumerate(v_dims)])
    drop_qk = torch.ones(D, dtype=torch.bool)
    drop_qk[keep_qk] = False
    drop_v = torch.ones(D, dtype=torch.bool)
    drop_v[keep_v] = False
    with torch.no_grad():
        for lin in (ref.linear_q, ref.linear_k, ref.linear_pos):
            lin.weight[drop_qk] = 0
            if lin.bias is not None:
                lin.bias[drop_qk] = 0
        ref.pos_bias_u.view(-1)[drop_qk] = 0
        ref.pos_bias_v.view(-1)[drop_qk] = 0
        ref.linear_v.weight[drop_v] = 0
        ref.linear_v.bias[drop_v] = 0
    rag = RaggedMultiHeadAttention(D, qk_dims, v_dims, DK, 0.0).eval()
    with torch.no_grad():
        for name in ("linear_q", "linear_k"):
            getattr(rag, name).weight.copy_(getattr(ref, name).weight[keep_qk])
            getattr(rag, name).bias.copy_(getattr(ref, name).bias[keep_qk])
        rag.linear_pos.weight.copy_(ref.linear_pos.weight[keep_qk])
        rag.pos_bias_u.copy_(ref.pos_bias_u.reshape(-1)[keep_qk])
        rag.pos_bias_v.copy_(ref.pos_bias_v.reshape(-1)[keep_qk])
        rag.linear_v.weight.copy_(ref.linear_v.weight[keep_v])
        rag.linear_v.bias.copy_(ref.linear_v.bias[keep_v])
        rag.linear_out.weight.copy_(ref.linear_out.weight[:, keep_v])
        rag.linear_out.bias.copy_(ref.linear_out.bias)
    return ref, rag


def _inputs(lengths=(11, 7, 4)):
    torch.manual_seed(1)
    t = max(lengths)
    x = torch.randn(len(lengths), t, D)
    valid = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    mask = ~(valid[:, :, None] & valid[:, None, :])  # True where attention is not allowed
    pos = RelPositionalEncoding(D, 0.0)
    pos.extend_pe(t, x.device, x.dtype)
    _, pos_emb = pos(x)
    return x, mask, pos_emb, valid


@pytest.mark.parametrize("qk_dims,v_dims", [
    ([8, 8, 8, 8], [8, 8, 8, 8]),  # nothing removed: the view path
    ([3, 3, 3, 3], [5, 5, 5, 5]),  # equal widths after pruning: the view path
    ([8, 2, 5, 1], [1, 8, 3, 6]),  # every head its own width
    ([0, 4, 8, 2], [3, 0, 2, 8]),  # a head with no query/key (uniform attention) and one with no values
])
@pytest.mark.parametrize("grad", [True, False], ids=["training-path", "inference"])
def test_ragged_attention_equals_nemo_attention_with_zeroed_dimensions(qk_dims, v_dims, grad):
    """Inference (no gradients, CPU) takes the fused projection with the values padded to a multiple of 8 and the
    additive mask; padded query frames give NeMo's output there too (zero weights, linear_out's bias)."""
    ref, rag = _pair(qk_dims, v_dims)
    x, mask, pos_emb, valid = _inputs()
    with torch.set_grad_enabled(grad):
        want = ref(x, x, x, mask, pos_emb)
        got = rag(x, x, x, mask, pos_emb)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert rag.cpu_v % 8 == 0 and rag.cpu_v >= rag.max_v
    if not grad:
        assert rag._inference_cache.value["out"].size(1) == rag.h * rag.cpu_v  # the padded layout was the one used


def test_ragged_attention_gradients_reach_the_kept_dimensions_only_once():
    """Backward through the per-head copies: gradients equal NeMo's on the kept rows."""
    qk_dims, v_dims = [8, 2, 5, 1], [1, 8, 3, 6]
    ref, rag = _pair(qk_dims, v_dims)
    x, mask, pos_emb, valid = _inputs()
    ref(x, x, x, mask, pos_emb)[valid].square().sum().backward()
    rag(x, x, x, mask, pos_emb)[valid].square().sum().backward()
    keep_qk = torch.cat([torch.arange(d) + h * DK for h, d in enumerate(qk_dims)])
    keep_v = torch.cat([torch.arange(d) + h * DK for h, d in enumerate(v_dims)])
    torch.testing.assert_close(rag.linear_q.weight.grad, ref.linear_q.weight.grad[keep_qk], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rag.linear_pos.weight.grad, ref.linear_pos.weight.grad[keep_qk], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rag.pos_bias_u.grad, ref.pos_bias_u.grad.reshape(-1)[keep_qk], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rag.linear_v.weight.grad, ref.linear_v.weight.grad[keep_v], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rag.linear_out.weight.grad, ref.linear_out.weight.grad[:, keep_v], rtol=1e-4,
                               atol=1e-5)


def test_ragged_attention_inference_cache_follows_parameter_changes():
    """Without gradients the padded weights are kept between calls; an in-place change of any parameter (an
    optimizer step, ``load_state_dict``) must not leave a stale copy behind, and a gradient-enabled call must reach
    the parameters."""
    qk_dims, v_dims = [8, 2, 5, 1], [1, 8, 3, 6]
    ref, rag = _pair(qk_dims, v_dims)
    x, mask, pos_emb, valid = _inputs()
    with torch.no_grad():
        rag(x, x, x, mask, pos_emb)  # fills the cache
        for name in ("linear_q", "linear_v", "linear_out", "linear_pos"):
            getattr(rag, name).weight.mul_(0.5)
            getattr(ref, name).weight.mul_(0.5)
        rag.pos_bias_u.add_(0.25)
        ref.pos_bias_u.add_(0.25 * (ref.pos_bias_u != 0))  # ref's pruned entries stay zero
        got, want = rag(x, x, x, mask, pos_emb), ref(x, x, x, mask, pos_emb)
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)
    rag(x, x, x, mask, pos_emb)[valid].sum().backward()
    assert rag.linear_q.weight.grad is not None and rag.linear_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("t1", [1, 2, 7, 30])
def test_rel_shift_view_equals_nemos_padded_shift_values_and_gradients(t1):
    """The strided-view shift gives NeMo's scores and gradients bit for bit (both only move numbers)."""
    torch.manual_seed(t1)
    x = torch.randn(3, 2, t1, 2 * t1 - 1, requires_grad=True)
    g = torch.randn(3, 2, t1, t1)
    ours = rel_shift(x)
    (ours * g).sum().backward()
    grad_ours, x.grad = x.grad.clone(), None
    nemo = RelPositionMultiHeadAttention.rel_shift(None, x)[..., :t1]
    (nemo * g).sum().backward()
    assert ours.shape == (3, 2, t1, t1)
    assert torch.equal(ours, nemo) and torch.equal(grad_ours, x.grad)
    # a shape the view does not cover (a streaming cache: P != 2 T1 - 1) takes NeMo's padded route
    y = torch.randn(2, 2, t1, 2 * t1 + 3)
    assert torch.equal(rel_shift(y), RelPositionMultiHeadAttention.rel_shift(None, y))


def test_encoder_attention_is_the_lean_one_and_matches_nemos_bit_for_bit():
    """Every relative-position attention of our encoder is the lean one (view shift, scores in place); the encoder's
    training outputs and gradients equal those of NeMo's own attention forward on a padded batch, bit for bit, and
    its inference outputs (one fused projection, the position biases folded into the query bias) within float
    rounding."""
    torch.manual_seed(0)
    enc = GroupNormConformerEncoder(feat_in=16, n_layers=2, d_model=32, n_heads=4, conv_kernel_size=5,
                                    subsampling_conv_channels=8, dropout=0.0, dropout_att=0.0, dropout_pre_encoder=0.0,
                                    dropout_emb=0.0, layer_n_heads=[4, 2])
    assert all(type(layer.self_attn) is LeanRelPositionMultiHeadAttention for layer in enc.layers)
    assert all(layer.self_attn.rel_shift is rel_shift for layer in enc.layers)
    feats, lengths = torch.randn(3, 16, 61), torch.tensor([61, 40, 23])
    with torch.no_grad():  # NeMo starts them at zero, which would hide a wrongly folded bias
        for layer in enc.layers:
            layer.self_attn.pos_bias_u.normal_()
            layer.self_attn.pos_bias_v.normal_()

    def run():
        enc.zero_grad(set_to_none=True)
        out, out_len = enc(audio_signal=feats, length=lengths)
        (out.sin() * (torch.arange(out.shape[-1]) < out_len[:, None, None])).sum().backward()
        with torch.no_grad():  # inference masks the attention weights in place
            inference = enc.eval()(audio_signal=feats, length=lengths)[0]
        enc.train()
        return out.detach(), [p.grad.clone() for p in enc.parameters()], inference

    out, grads, inference = run()
    for layer in enc.layers:
        layer.self_attn.__class__ = RelPositionMultiHeadAttention  # NeMo's forward and NeMo's padded rel_shift
    ref_out, ref_grads, ref_inference = run()
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert not torch.equal(inference, ref_inference)  # the fused inference projection was taken
    torch.testing.assert_close(inference, ref_inference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ragged", [False, True])
def test_inference_weights_follow_a_fused_optimizer_step(ragged):
    """torch's fused AdamW updates parameters in place without bumping their versions: the weights inference keeps
    (fused projections, padded heads, FFN hidden layers padded to a multiple of 8) must still follow every training
    step, as Lightning's validation runs them, and also a step taken after an inference call in the same mode."""
    torch.manual_seed(0)
    enc = GroupNormConformerEncoder(feat_in=16, n_layers=2, d_model=32, n_heads=4, conv_kernel_size=5,
                                    subsampling_conv_channels=8, conv_norm_type="group_norm4",
                                    ff_hidden=[[37, 50]] * 2 if ragged else None,
                                    layer_qk_dims=[[8, 5, 8, 3]] * 2 if ragged else None,
                                    layer_v_dims=[[2, 8, 8, 6]] * 2 if ragged else None)
    assert (type(enc.layers[0].self_attn) is RaggedMultiHeadAttention) == ragged
    feats, lengths = torch.randn(3, 16, 61), torch.tensor([61, 40, 23])
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, fused=True)

    def check():
        with torch.no_grad():
            inferred = enc(audio_signal=feats, length=lengths)[0]
        reference = enc(audio_signal=feats, length=lengths)[0].detach()  # with gradients: nothing kept
        torch.testing.assert_close(inferred, reference, rtol=1e-5, atol=1e-5)

    for _ in range(2):
        with torch.no_grad():  # validation: builds the kept weights
            enc.eval()(audio_signal=feats, length=lengths)
        enc.train()
        opt.zero_grad()
        enc(audio_signal=feats, length=lengths)[0].square().mean().backward()
        opt.step()
        enc.eval()
        check()
    if ragged:
        assert "_inference_cache" in enc.layers[0].feed_forward1.__dict__  # the padded FFN path was taken
    opt.zero_grad()  # in eval mode throughout: backward, then an inference call keeps weights, then the step
    enc(audio_signal=feats, length=lengths)[0].square().mean().backward()
    with torch.no_grad():
        enc(audio_signal=feats, length=lengths)
    opt.step()
    check()


def test_inference_weights_are_kept_between_calls_and_follow_swapped_parameters():
    """The kept weights are looked up, not rebuilt, on every inference call of a forward (the lookup reads the
    parameter slots it recorded instead of walking the module); a parameter assigned anew, put straight into
    ``_parameters`` (as ``Module._apply`` does), a submodule swapped for another, or a bias set to None is seen at
    the next call."""
    from torch import nn

    from nemo_layerfx.encoder.inference import inference_cache

    qk_dims, v_dims = [8, 2, 5, 1], [1, 8, 3, 6]
    ref, rag = _pair(qk_dims, v_dims)
    x, mask, pos_emb, valid = _inputs()
    new_q = nn.Linear(rag.linear_q.in_features, rag.linear_q.out_features)  # made before any weights are kept
    builds = []

    def counted():
        builds.append(1)
        return rag._build_padded_weights()

    with torch.no_grad():
        for _ in range(3):
            inference_cache(rag, counted)
        assert len(builds) == 1

        def check():
            torch.testing.assert_close(rag(x, x, x, mask, pos_emb)[valid], ref(x, x, x, mask, pos_emb)[valid],
                                       rtol=0, atol=1e-5)

        check()
        rag.linear_out.weight = nn.Parameter(rag.linear_out.weight * 0.5)  # assigned: registration hook
        ref.linear_out.weight.mul_(0.5)
        check()
        rag.linear_v._parameters["bias"] = nn.Parameter(rag.linear_v.bias + 0.25)  # no hook: the slot is read
        ref.linear_v.bias.add_(0.25 * (ref.linear_v.bias != 0))  # ref's pruned entries stay zero
        check()
        new_q.weight.copy_(rag.linear_q.weight * 2.0)
        new_q.bias.copy_(rag.linear_q.bias)
        rag.linear_q = new_q  # a swapped submodule: registration hook
        ref.linear_q.weight.mul_(2.0)
        check()
        rag.linear_k.bias = None  # no hook either: the slot reads None
        ref.linear_k.bias.zero_()
        check()


@pytest.mark.parametrize("context", [None, (3, 0), (2, 2)], ids=["full", "causal-3", "limited-2-2"])
def test_inference_masking_by_addition_equals_nemos_masked_fill_bit_for_bit(context):
    """CPU inference masks the scores by adding -INF_VAL (``additive_mask``) and zeroes the rows of padded query
    frames afterwards; NeMo fills before and after the softmax. Same numbers bit for bit, with padded frames and
    limited attention contexts; the additive form kept for one mask tensor follows an in-place change of it."""
    from nemo_layerfx.encoder.attention import attend

    torch.manual_seed(0)
    b, h, t = 3, 4, 13
    valid = torch.arange(t)[None] < torch.tensor([13, 9, 4])[:, None]
    mask = ~(valid[:, :, None] & valid[:, None, :])
    if context is not None:
        rel = torch.arange(t)[None, :] - torch.arange(t)[:, None]  # key - query
        mask = mask | ((rel < -context[0]) | (rel > context[1]))[None]
    scores, v = torch.randn(b, h, t, t) * 4, torch.randn(b, h, t, 5)
    drop = torch.nn.Dropout(0.0).eval()
    with torch.enable_grad():  # NeMo's masked_fill arithmetic
        want = attend(scores.clone(), mask, drop, v)
    with torch.no_grad():
        got = attend(scores.clone(), mask, drop, v)
        assert torch.equal(got, want)
        rows = got.transpose(1, 2)[~valid]  # (padded query frames, H, d_v)
        assert rows.numel() and torch.equal(rows, torch.zeros_like(rows))  # padded query frames: zero output
        mask[0, 0, 1] = True  # the same tensor, written to: the kept additive form must not be reused
        with torch.enable_grad():
            want = attend(scores.clone(), mask, drop, v)
        assert torch.equal(attend(scores.clone(), mask, drop, v), want)


@pytest.mark.slow  # a fresh interpreter: the hooks are process-wide
def test_importing_the_package_installs_no_process_wide_hooks():
    """The inference cache's optimizer and registration hooks are installed by the first kept value, not by
    ``import nemo_layerfx``: a process that never runs our inference path is left as it was."""
    from conftest import fresh_python

    code = (
        "import torch, nemo_layerfx\n"
        "from torch.optim import optimizer\n"
        "from torch.nn.modules import module\n"
        "from nemo_layerfx.encoder import inference\n"
        "before = (len(optimizer._global_optimizer_post_hooks), len(module._global_parameter_registration_hooks),"
        " inference.watching())\n"
        "enc = nemo_layerfx.GroupNormConformerEncoder(feat_in=16, n_layers=1, d_model=32, n_heads=4,"
        " conv_norm_type='group_norm4').eval()\n"
        "with torch.no_grad():\n"
        "    enc(audio_signal=torch.randn(1, 16, 40), length=torch.tensor([40]))\n"
        "print(before, (len(optimizer._global_optimizer_post_hooks), inference.watching()))\n")
    assert fresh_python(code) == "(0, 0, False) (1, True)"
