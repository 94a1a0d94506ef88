"""Low-rank training (Fernandez-Lopez et al.): factorized linears, rank maps, the paper's arithmetic, training,
.nemo round trips, rewrite/merge of trained models, composition with the other capabilities, clear errors."""

from __future__ import annotations

import math
import pytest
import torch
from conftest import encoded
from omegaconf import OmegaConf, open_dict
from torch import nn

import nemo_layerfx  # noqa: F401
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo_layerfx.encoder import GroupNormConformerEncoder
from nemo_layerfx.fd import DropoutPlan, extract
from nemo_layerfx.importance import ProbeConfig, layer_snapshot, probe
from nemo_layerfx.lowrank import (
    LowRankLinear, block_alphas, factorized_params, low_rank_modules, lowrank, merge, rank_for,
)
from nemo_layerfx.models import restore
from nemo_layerfx.train import model_class, train

LR_SMS = {"att": [0.1, 0.2], "ffn": [0.2, 0.5]}


def encoder(low_rank=None, n_layers=3, d_model=32, seed=0, **kw):
    torch.manual_seed(seed)
    return GroupNormConformerEncoder(feat_in=20, n_layers=n_layers, d_model=d_model, n_heads=4,
                                     conv_norm_type="group_norm4", conv_kernel_size=5, low_rank=low_rank, **kw).eval()


def run(enc, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, lengths = torch.randn(3, 20, 64, generator=g), torch.tensor([64, 50, 21])  # padded batch
    with torch.no_grad():
        return enc(audio_signal=x, length=lengths)[0]


@pytest.mark.unit
@pytest.mark.parametrize("pointwise", [False, True])
def test_svd_init_at_full_rank_reproduces_the_dense_initial_weight(pointwise):
    torch.manual_seed(3)
    dense = nn.Conv1d(24, 40, 1) if pointwise else nn.Linear(24, 40)
    low = LowRankLinear.from_dense(dense, rank=24)
    assert low.U.shape == (40, 24) and low.Vt.shape == (24, 24) and torch.equal(low.bias, dense.bias)
    torch.testing.assert_close(low.U @ low.Vt, dense.weight.reshape(40, 24), rtol=0, atol=1e-6)
    x = torch.randn(2, 24, 7) if pointwise else torch.randn(5, 24)
    torch.testing.assert_close(low(x), dense(x), rtol=0, atol=1e-5)
    # spectral factors: U = Û√Σ, Vᵀ = √ΣV̂ᵀ, so U and Vᵀ carry the same singular values
    torch.testing.assert_close(torch.linalg.svdvals(low.U), torch.linalg.svdvals(low.Vt), rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_encoder_option_factorizes_the_modules_own_init():
    """At α = 1 every linear is factorized at full rank, and (SVD draws nothing) the factors multiply back to
    exactly the weights a dense encoder built under the same seed has."""
    dense, full = encoder(), encoder({"att": 1.0, "ffn": 1.0, "conv": 1.0})
    n_low = 0
    for (name, d), (_, f) in zip(dense.named_modules(), full.named_modules()):
        if isinstance(f, LowRankLinear):
            n_low += 1
            torch.testing.assert_close(f.merge().weight, d.weight, rtol=0, atol=2e-6)
    assert n_low == 3 * 11  # 5 attention + 4 FFN linears + 2 pointwise convs per layer
    torch.testing.assert_close(run(full), run(dense), rtol=0, atol=1e-4)


@pytest.mark.unit
def test_merge_is_exact():
    low = encoder(LR_SMS)
    merged = encoder(LR_SMS)
    merged.load_state_dict(low.state_dict())
    for name, m in list(merged.named_modules()):
        if isinstance(m, LowRankLinear):
            parent, _, attr = name.rpartition(".")
            setattr(merged.get_submodule(parent), attr, m.merge())
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    torch.testing.assert_close(run(merged), run(low), rtol=0, atol=1e-5)


def closed_form(d_model: int, d_ff: int, n_blocks: int, att, ffn) -> int:
    """Parameters removed from an encoder by rank maps, written out independently of the library."""
    def alphas(spec):
        return [spec] * n_blocks if isinstance(spec, float) else \
            [spec[0] + b * (spec[1] - spec[0]) / n_blocks for b in range(n_blocks)]

    saved = 0
    for b in range(n_blocks):
        r_att = max(1, math.floor(alphas(att)[b] * d_model + 0.5))
        r_ffn = max(1, math.floor(alphas(ffn)[b] * d_model + 0.5))
        saved += 5 * (d_model * d_model - r_att * 2 * d_model)  # q, k, v, out, pos
        saved += 4 * (d_model * d_ff - r_ffn * (d_model + d_ff))  # linear1, linear2 of both FFNs
    return saved


@pytest.mark.unit
@pytest.mark.parametrize("att, ffn", [(0.25, 0.5), ([0.1, 0.2], [0.2, 0.5]), ([0.3, 0.1], 0.4)])
def test_parameter_count_equals_the_closed_form(att, ffn):
    dense, low = encoder(n_layers=4, d_model=64), encoder({"att": att, "ffn": ffn}, n_layers=4, d_model=64)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dense) - count(low) == closed_form(64, 256, 4, att if isinstance(att, float) else tuple(att),
                                                    ffn if isinstance(ffn, float) else tuple(ffn))


# Fernandez-Lopez et al., Tables I and II: the 243M model (12-block d=768 / FFN 3072 Conformer encoder, 5 attention
# linears incl. linear_pos, 2 FFNs per block; 6-block decoder with 8 attention linears and 1 FFN per block).
PAPER_ROWS = [  # (MHSA spec, FFN spec, #params printed in the paper, millions)
    (0.25, None, 211), (0.12, None, 194), (0.06, None, 186), (None, 0.5, 189), (None, 0.25, 145), (None, 0.06, 112),
    (0.25, 0.25, 113), (0.23, 0.23, 107), ((0.1, 0.2), None, 197), ((0.2, 0.4), (0.4, 0.6), 161),
    ((0.1, 0.2), (0.2, 0.5), 115), ((0.1, 0.2), (0.2, 0.4), 107),
]


def paper_savings(att, ffn) -> int:
    saved = 0
    for blocks, n_att, n_ffn in ((12, 5, 2), (6, 8, 1)):  # encoder and decoder ramp separately (B = 12, 6)
        for spec, shapes in ((att, [(768, 768)] * n_att), (ffn, [(3072, 768), (768, 3072)] * n_ffn)):
            if spec is None:
                continue
            for b, alpha in enumerate(block_alphas(list(spec) if isinstance(spec, tuple) else spec, blocks)):
                for m, n in shapes:
                    saved += m * n - factorized_params(m, n, rank_for(alpha, m, n))
    return saved


@pytest.mark.unit
@pytest.mark.parametrize("att, ffn, printed", PAPER_ROWS)
def test_rank_maps_reproduce_the_papers_parameter_counts(att, ffn, printed):
    """The paper prints counts truncated to whole millions of a 243.0M model: our arithmetic gives exactly the
    printed figure after truncation (so the difference is under 1M; 0.4M for the headline 243M -> 115M row)."""
    predicted = 243.0 - paper_savings(att, ffn) / 1e6
    assert math.floor(predicted) == printed, predicted
    if (att, ffn) == ((0.1, 0.2), (0.2, 0.5)):
        assert abs((243 - printed) - paper_savings(att, ffn) / 1e6) < 0.5
    assert abs(243.0 - paper_savings(0.12, 0.12) / 1e6 - 74.2) < 0.05  # the one row printed with a decimal


@pytest.mark.unit
def test_rank_rounding_and_explicit_ranks():
    assert [rank_for(a, 64, 256) for a in (0.001, 0.1, 0.5, 1.0)] == [1, 6, 32, 64]
    assert rank_for(0.1, 64, 256, multiple_of=8) == 8 and rank_for(0.99, 64, 256, multiple_of=48) == 64
    assert block_alphas([0.2, 0.6], 4) == pytest.approx([0.2, 0.3, 0.4, 0.5])  # b = 0..B-1: never reaches α_f
    enc = encoder({"ffn": {"ranks": [3, 5, 7]}, "targets": ["linear1"]})
    assert [layer.feed_forward1.linear1.rank for layer in enc.layers] == [3, 5, 7]
    assert isinstance(enc.layers[0].feed_forward1.linear2, nn.Linear)  # not targeted
    assert isinstance(enc.layers[0].self_attn.linear_q, nn.Linear)  # att has no spec


@pytest.mark.unit
@pytest.mark.parametrize("spec, message", [
    ({"att": 1.5}, r"low_rank.att: α = 1.5 is outside \(0, 1\]"),
    ({"ffn": 0.0}, r"low_rank.ffn: α = 0.0 is outside \(0, 1\]"),
    ({"ffn": [0.1, 0.2, 0.3]}, r"a ramp has exactly two values"),
    ({"ffn": {"ranks": [4, 4]}}, r"low_rank.ffn.ranks has 2 entries but the encoder has 3 blocks"),
    ({"ffn": {"ranks": [4, 0, 4]}}, r"low_rank.ffn.ranks must be integers >= 1"),
    ({"att": 0.5, "targets": ["linear_z"]}, r"unknown low_rank target kind\(s\) \['linear_z'\]; choose from linear_q"),
    ({"att": 0.5, "targets": ["linear1"]}, r"targets \['linear1'\] belong to group\(s\) without a rank spec \(ffn\)"),
    ({}, r"low_rank needs a rank spec for at least one of att, ffn, conv"),
    ({"att": 0.5, "rank": 3}, r"unknown low_rank field\(s\) \['rank'\]"),
    ({"att": 0.5, "init": "xavier"}, r"unknown low_rank init 'xavier'; choose svd or kaiming"),
])
def test_bad_rank_maps_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        encoder(spec)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["conformer_gn_lowrank_tiny", "conformer_gn_transducer_tiny"])
def test_trains_through_the_entry_point_and_round_trips(tiny_cfg, tmp_path, name):
    extra = [] if "lowrank" in name else ["+model.encoder.low_rank={att: [0.1, 0.2], ffn: [0.2, 0.5]}"]
    cfg = tiny_cfg(name, *extra, f"layerfx.save_to={tmp_path}/model.nemo")
    torch.manual_seed(0)
    init = layer_snapshot(model_class(cfg)(cfg=cfg.model))
    torch.manual_seed(0)
    model = train(cfg)
    assert model.trainer.global_step == 2
    lows = low_rank_modules(model)
    assert len(lows) == 2 * 9 and all(m.rank < min(m.in_features, m.out_features) for m in lows.values())
    moved = [k for k, v in layer_snapshot(model).items() if k.endswith((".U", ".Vt")) and not torch.equal(v, init[k])]
    assert len(moved) == 2 * 2 * 9  # both factors of every factorized linear were trained
    again = restore(tmp_path / "model.nemo")
    assert again.cfg.encoder.low_rank.att == [0.1, 0.2]
    state, state2 = model.state_dict(), again.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


@pytest.fixture
def trained(tiny_cfg):
    cfg = tiny_cfg("conformer_gn_tiny", "model.encoder.n_layers=3", "model.encoder.n_heads=4")
    torch.manual_seed(0)
    model = EncDecCTCModelBPE(cfg=cfg.model).eval()
    with torch.no_grad():  # stand-in for training: weights that are not a fresh init
        for p in model.encoder.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def encode(model):
    return encoded(model)[0]  # on a padded batch


@pytest.mark.integration
def test_lowrank_of_a_trained_model_and_merge_back(trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    full, report = lowrank(trained, {"att": 1.0, "ffn": 1.0})  # full rank: the truncated SVD is exact
    torch.testing.assert_close(encode(full), encode(trained), rtol=0, atol=1e-4)
    small, report = lowrank(trained, LR_SMS)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # input untouched
    assert report.after["model"] == sum(p.numel() for p in small.parameters()) < report.before["model"]
    assert report.before["encoder"] - report.after["encoder"] == closed_form(32, 128, 3, (0.1, 0.2), (0.2, 0.5))
    dense, back = merge(small)
    assert back.after["model"] == report.before["model"] and "low_rank" not in dense.cfg.encoder
    torch.testing.assert_close(encode(dense), encode(small), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already has factorized"):
        lowrank(small, LR_SMS)
    with pytest.raises(ValueError, match="nothing to merge: the model has no factorized"):
        merge(trained)


@pytest.mark.integration
def test_composes_with_probe_and_refuses_federated_dropout(trained, corpus):
    small, _ = lowrank(trained, LR_SMS)
    init = layer_snapshot(small)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    report = probe(small, corpus / "dev_manifest.json", ProbeConfig(modes=("reinit", "rerand")), init=init)
    assert len(report.units) == 3 and report.churn is not None
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())  # restored exactly
    with pytest.raises(ValueError, match=r"(self_attn|feed_forward\d)\.linear\w+ is a LowRankLinear, not a dense layer.*layerfx merge"):
        extract(small, DropoutPlan.flat(3, 0.5))


@pytest.mark.integration
def test_rerand_draws_a_fresh_spectral_init():
    from nemo_layerfx.importance import fresh_draw

    layer = encoder(LR_SMS).layers[1]
    a, b = fresh_draw(layer, seed=1), fresh_draw(layer, seed=1)
    c = fresh_draw(layer, seed=2)
    key = "feed_forward1.linear1.U"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    # a spectral init: U and Vᵀ share their singular values
    torch.testing.assert_close(torch.linalg.svdvals(a[key]), torch.linalg.svdvals(a["feed_forward1.linear1.Vt"]),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_lowrank_and_merge_commands(trained, tmp_path, capsys):
    from nemo_layerfx_cli import main as layerfx

    src, small, dense = tmp_path / "model.nemo", tmp_path / "small.nemo", tmp_path / "dense.nemo"
    trained.save_to(str(src))
    assert layerfx(["lowrank", str(src), str(small), "--att", "0.1,0.2", "--ffn", "0.2,0.5"]) == 0
    out = capsys.readouterr().out
    assert "encoder parameters:" in out and "model parameters:" in out and small.is_file()
    assert layerfx(["merge", str(small), str(dense)]) == 0
    torch.testing.assert_close(encode(restore(dense)), encode(restore(small)), rtol=0, atol=1e-5)
    for args, message in [
        (["lowrank", str(src), str(tmp_path / "x.nemo"), "--ffn", "1.5"], "--ffn 1.5: low_rank.ffn: α = 1.5 is outside (0, 1]"),
        (["lowrank", str(src), str(tmp_path / "x.nemo"), "--att", "0.1,0.2,0.3"], "a ramp has exactly two values"),
        (["lowrank", str(src), str(tmp_path / "x.nemo")], "give at least one of --att, --ffn, --conv"),
        (["lowrank", str(src), str(src), "--ffn", "0.5"], "refusing to overwrite the input model"),
        (["merge", str(src), str(tmp_path / "x.nemo")], "nothing to merge: the model has no factorized"),
    ]:
        assert layerfx(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists()


@pytest.mark.integration
def test_lowrank_refuses_models_it_cannot_rebuild(tiny_cfg):
    cfg = OmegaConf.create(OmegaConf.to_container(tiny_cfg("conformer_gn_tiny").model, resolve=True))
    with open_dict(cfg):
        cfg.encoder = {"_target_": "nemo.collections.asr.modules.ConvASREncoder", "feat_in": 80,
                       "activation": "relu", "conv_mask": True,
                       "jasper": [{"filters": 32, "repeat": 1, "kernel": [11], "stride": [2], "dilation": [1],
                                   "dropout": 0.0, "residual": False, "separable": True}]}
    with pytest.raises(ValueError, match="model has no Conformer encoder"):
        lowrank(EncDecCTCModelBPE(cfg=cfg), LR_SMS)
    from nemo_layerfx.encoder import stock_encoder_config

    # NeMo's own padding-leaky group_norm: adopting it would change what it computes under padding
    cfg = OmegaConf.create(OmegaConf.to_container(tiny_cfg("conformer_gn_tiny").model, resolve=True))
    with open_dict(cfg):
        cfg.encoder = stock_encoder_config(cfg.encoder)
    assert cfg.encoder.conv_norm_type == "group_norm4"
    with pytest.raises(ValueError, match=r"NeMo's group_norm4, which counts padded frames.*`layerfx convert-norm`"):
        lowrank(EncDecCTCModelBPE(cfg=cfg), LR_SMS)
    # a BatchNorm stock model is adopted (its norm kept): tests/test_stock.py


@pytest.mark.integration
def test_kaiming_init_is_the_papers_ablation():
    enc = encoder({"ffn": 0.25, "init": "kaiming"})
    lin = enc.layers[0].feed_forward1.linear1
    bound = 1 / math.sqrt(lin.rank)  # kaiming_uniform(a=√5) on U (m x r): fan_in = r
    assert lin.init == "kaiming" and lin.U.abs().max() <= bound
    s_u, s_v = torch.linalg.svdvals(lin.U), torch.linalg.svdvals(lin.Vt)
    assert not torch.allclose(s_u, s_v, rtol=1e-2)  # not a spectral init



@pytest.mark.unit
def test_energy_rank_and_probe_ordered_alphas():
    from nemo_layerfx.lowrank import alphas_from_report, energy_profile, energy_rank

    q1, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    w = q1[:, :5] @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ q2.T
    assert [energy_rank(w, e) for e in (0.6, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]  # energies 9/14, 13/14, 14/14
    report = {"units": ["layers.0", "layers.1", "layers.2", "layers.3"], "delta_wer": {"rerand": [0.3, 0.0, 0.1, 0.05]}}
    assert alphas_from_report(report, 0.1, 0.2) == pytest.approx([0.175, 0.1, 0.15, 0.125])
    enc = encoder({"ffn": {"alphas": [0.5, 0.25, 0.125]}, "att": 1.0}, d_model=64)
    assert [layer.feed_forward2.linear2.rank for layer in enc.layers] == [32, 16, 8]
    model = type("M", (nn.Module,), {})()
    model.encoder = enc
    profile = energy_profile(model)
    assert all(0 < v <= 1 for g in ("att", "ffn", "conv") for v in profile[g]) and len(profile["ffn"]) == 3
    assert profile["ffn"][2] <= 8 / 64  # a rank-8 map cannot need more than 8 singular values
    with pytest.raises(ValueError, match="needs a block-level probe report"):
        alphas_from_report({"units": ["layers.0.attn"], "delta_wer": {"rerand": [0.1]}}, 0.1, 0.2)
