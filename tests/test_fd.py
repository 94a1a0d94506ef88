"""Federated-dropout submodels: the unit map, plans, exact extraction, the way back, and clear errors."""

from __future__ import annotations

import pytest
import torch

import nemo_layerfx  # noqa: F401
from conftest import encoded
from nemo_layerfx.fd import (
    DropoutPlan, ServerOptimizer, aggregate, choose_units, expand, extract, plan_param_count, unit_seed,
)
from nemo_layerfx.models import clone_model
from nemo_layerfx.surgery import mask_units_, slice_state, tensor_index
from nemo_layerfx.train import model_class
from nemo_layerfx.units import FD_KINDS, n_units

WIDE = ["model.encoder.n_heads=4", "model.encoder.n_layers=3"]  # d_model 32, 4 heads of 8, 4 GN groups of 8
ALL = ("ffn", "head", "conv")


def build(tiny_cfg, name="conformer_gn_tiny", *extra):
    cfg = tiny_cfg(name, *WIDE, *extra)
    torch.manual_seed(0)
    return model_class(cfg)(cfg=cfg.model).eval()


@pytest.fixture
def ctc(tiny_cfg):
    return build(tiny_cfg)


encode = encoded  # on a padded batch: padding must not matter either


@pytest.mark.unit
def test_unit_counts_of_a_model(ctc):
    assert {k: n_units(ctc.encoder.layers[0], k) for k in FD_KINDS} == {"ffn1": 128, "ffn2": 128, "head": 4, "conv": 4}


@pytest.mark.integration
def test_a_plan_that_drops_nothing_reproduces_the_model(ctc):
    sub, units = extract(ctc, DropoutPlan.flat(3, 0.0, kinds=ALL), seed=5)
    full, sub_state = ctc.state_dict(), sub.state_dict()
    assert full.keys() == sub_state.keys() and all(torch.equal(full[k], sub_state[k]) for k in full)
    out, out_len = encode(sub)
    ref, ref_len = encode(ctc)
    assert torch.equal(out, ref) and torch.equal(out_len, ref_len)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["conformer_gn_tiny", "conformer_gn_transducer_tiny", "conformer_gn_hybrid_tiny"])
@pytest.mark.parametrize("kinds", [("ffn",), ("head",), ("conv",), ALL])
def test_submodel_equals_full_model_with_units_masked(tiny_cfg, name, kinds):
    model = build(tiny_cfg, name)
    plan = DropoutPlan({k: [0.5, 0.25, 0.75] for k in kinds})
    sub, units = extract(model, plan, seed=11)
    assert type(sub) is type(model) and sub.cfg.encoder.d_model == model.cfg.encoder.d_model
    masked = clone_model(model)
    mask_units_(masked, units)
    out, _ = encode(sub)
    ref, _ = encode(masked)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    full, _ = encode(model)
    assert (out - full).abs().max() > 1e-3  # the dropped units did matter


@pytest.mark.integration
@pytest.mark.parametrize("plan", [
    DropoutPlan.flat(3, 0.5, kinds=ALL),
    DropoutPlan({"ffn": [0.1, 0.5, 0.9]}),
    DropoutPlan({"head": [0.0, 0.5, 0.7], "conv": [0.3, 0.0, 0.6]}),
])
def test_parameter_count_matches_the_plan_arithmetic(ctc, plan):
    sub, units = extract(ctc, plan, seed=2)
    assert sum(p.numel() for p in sub.parameters()) == plan_param_count(ctc, plan) == plan_param_count(ctc, units)
    layer = sub.encoder.layers[2]
    if "ffn" in plan.rates:
        assert layer.feed_forward1.linear1.out_features == round(128 * (1 - plan.rates["ffn"][2]))


@pytest.mark.integration
def test_extract_then_expand_of_unchanged_weights_is_the_identity(ctc):
    sub, units = extract(ctc, DropoutPlan.flat(3, 0.5, kinds=ALL), seed=4)
    global_state = ctc.state_dict()
    index = tensor_index(ctc, units)
    keys = [k for k, v in global_state.items() if v.is_floating_point()]
    shapes = {k: global_state[k].shape for k in keys}
    full, cover = expand({k: sub.state_dict()[k] for k in keys}, index, shapes)
    for k in keys:
        torch.testing.assert_close(full[k] * cover[k], global_state[k] * cover[k], rtol=0, atol=0)
        assert full[k].shape == global_state[k].shape
    assert sum(int(cover[k].sum()) for k in index) < sum(global_state[k].numel() for k in index)
    zero = aggregate(global_state, [(sub.state_dict(), units, 10.0)], ctc)
    assert all(float(d.abs().max()) == 0.0 for d in zero.values())


@pytest.mark.integration
def test_zero_fill_and_coverage_aggregation_rules(ctc):
    """Two clients, each adding a constant to every tensor it holds: the averages are known in closed form."""
    plan = DropoutPlan.flat(3, 0.5, kinds=ALL)
    global_state = ctc.state_dict()
    results = []
    for client, (add, weight) in enumerate([(1.0, 1.0), (3.0, 3.0)]):
        sub, units = extract(ctc, plan, seed=unit_seed(0, 1, client, "pcpr"))
        results.append(({k: v + add if v.is_floating_point() else v for k, v in sub.state_dict().items()}, units, weight))
    cov = [expand({k: torch.ones_like(v) for k, v in slice_state(global_state, tensor_index(ctc, u)).items()
                   if v.is_floating_point()}, tensor_index(ctc, u),
                  {k: v.shape for k, v in global_state.items() if v.is_floating_point()})[1] for _, u, _ in results]
    zf = aggregate(global_state, results, ctc, rule="zero_fill")
    cv = aggregate(global_state, results, ctc, rule="coverage")
    key = "encoder.layers.1.feed_forward1.linear1.weight"
    a, b = cov[0][key], cov[1][key]
    torch.testing.assert_close(zf[key], (1.0 * a + 9.0 * b) / 4.0)
    both, only_a, only_b = (a * b) > 0, (a > 0) & (b == 0), (b > 0) & (a == 0)
    assert both.any() and only_a.any() and only_b.any() and ((a + b) == 0).any()
    assert torch.allclose(cv[key][both], torch.tensor(10.0 / 4.0))
    assert torch.allclose(cv[key][only_a], torch.tensor(1.0)) and torch.allclose(cv[key][only_b], torch.tensor(3.0))
    assert torch.all(cv[key][(a + b) == 0] == 0)
    fixed = "encoder.layers.1.norm_out.weight"  # never sliced: both rules give the weighted mean 2.5
    assert torch.allclose(zf[fixed], torch.tensor(2.5)) and torch.allclose(cv[fixed], torch.tensor(2.5))


@pytest.mark.unit
def test_server_optimizers():
    w = {"a": torch.zeros(3)}
    ServerOptimizer("fedavg", lr=0.5).step_(w, {"a": torch.tensor([2.0, -2.0, 0.0])})
    assert torch.equal(w["a"], torch.tensor([1.0, -1.0, 0.0]))
    w, adam = {"a": torch.zeros(2)}, ServerOptimizer("fedadam", lr=0.1, tau=1e-3)
    adam.step_(w, {"a": torch.tensor([1.0, -4.0])})  # first step: m = 0.1 d, v = 0.01 d^2 -> ~lr * sign(d)
    torch.testing.assert_close(w["a"], 0.1 * torch.tensor([0.1 / (0.1 + 1e-3), -0.4 / (0.4 + 1e-3)]))
    with pytest.raises(ValueError, match="unknown server optimizer 'sgd'"):
        ServerOptimizer("sgd")


@pytest.mark.integration
def test_units_are_seeded_per_client_per_round_or_per_round(ctc):
    plan = DropoutPlan.flat(3, 0.5, kinds=ALL)
    same = [choose_units(ctc, plan, unit_seed(0, 2, c, "pr"))[1]["ffn1"] for c in range(2)]
    own = [choose_units(ctc, plan, unit_seed(0, 2, c, "pcpr"))[1]["ffn1"] for c in range(2)]
    assert torch.equal(same[0], same[1]) and not torch.equal(own[0], own[1])
    again = choose_units(ctc, plan, unit_seed(0, 2, 1, "pcpr"))[1]["ffn1"]
    assert torch.equal(again, own[1]) and len(again) == 64


@pytest.mark.integration
def test_targeted_plans_from_a_probe_report(ctc):
    report = {"units": ["layers.0", "layers.1", "layers.2"], "delta_wer": {"rerand": [0.02, 0.30, 0.01]}}
    amb = DropoutPlan.targeted(report, n=2, rate=0.5, base_rate=0.1, target="ambient")
    crit = DropoutPlan.targeted(report, n=1, rate=0.5, target="critical", kinds=ALL)
    assert amb.rates == {"ffn": [0.5, 0.1, 0.5]} and amb.label == "Amb-2 50% | flat 10%"
    assert crit.rates["conv"] == [0.0, 0.5, 0.0] and crit.label == "Crit-1 50%"
    sub, _ = extract(ctc, amb, seed=0)
    assert [layer.feed_forward2.linear1.out_features for layer in sub.encoder.layers] == [64, 115, 64]


@pytest.mark.integration
def test_submodel_trains_with_nemo_and_round_trips_as_nemo(tiny_cfg, corpus, tmp_path):
    import lightning.pytorch as pl

    model = build(tiny_cfg, "conformer_gn_transducer_tiny")
    sub, units = extract(model, DropoutPlan.flat(3, 0.5, kinds=ALL), seed=1)
    client = sorted((corpus / "clients").glob("*.json"))[0]
    sub.setup_training_data({"manifest_filepath": str(client), "sample_rate": 16000, "batch_size": 4,
                             "shuffle": True, "num_workers": 0})
    before = {k: v.clone() for k, v in sub.state_dict().items()}
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    sub.set_trainer(trainer)
    trainer.fit(sub)
    assert trainer.global_step == 2
    changed = [k for k in before if not torch.equal(before[k], sub.state_dict()[k])]
    assert any("encoder.layers" in k for k in changed)
    sub.save_to(str(tmp_path / "client.nemo"))
    restored = type(sub).restore_from(str(tmp_path / "client.nemo"), map_location="cpu")
    assert restored.cfg.fd_submodel.units["0"]["head"] == units[0]["head"].tolist()
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in sub.state_dict().items())


@pytest.mark.integration
def test_bad_plans_and_models_are_rejected(ctc, tiny_cfg):
    with pytest.raises(ValueError, match=r"ffn rate for layers.1 is 1.0; a dropout rate is the fraction of units "
                                         r"dropped, in \[0, 1\)"):
        DropoutPlan({"ffn": [0.5, 1.0, 0.0]})
    with pytest.raises(ValueError, match="rate for layers.0 is -0.1"):
        DropoutPlan.flat(3, -0.1)
    with pytest.raises(ValueError, match=r"unknown unit kind\(s\) \['neurons'\]"):
        DropoutPlan({"neurons": [0.1]})
    with pytest.raises(ValueError, match="unknown mapping 'per-epoch'"):
        DropoutPlan.flat(3, 0.1, mapping="per-epoch")
    with pytest.raises(ValueError, match=r"rates for 5 layers but the encoder has n_layers=3 \(layers.0 … layers.2\)"):
        extract(ctc, DropoutPlan.flat(5, 0.2))
    big_report = {"units": [f"layers.{i}" for i in range(6)], "delta_wer": {"rerand": [0.1] * 6}}
    with pytest.raises(ValueError, match="rates for 6 layers but the encoder has n_layers=3"):
        extract(ctc, DropoutPlan.targeted(big_report, n=2, rate=0.5))
    with pytest.raises(ValueError, match="needs a block-level probe report"):
        DropoutPlan.targeted({"units": ["layers.0.ffn1"], "delta_wer": {"rerand": [0.1]}}, n=1, rate=0.5)
    with pytest.raises(ValueError, match="n=4: the report ranks 3 layers"):
        DropoutPlan.targeted({"units": ["layers.0", "layers.1", "layers.2"], "delta_wer": {"rerand": [0] * 3}},
                             n=4, rate=0.5)
    stock = build(tiny_cfg, "conformer_gn_tiny", "model.encoder._target_=nemo.collections.asr.modules.ConformerEncoder",
                  "model.encoder.conv_norm_type=batch_norm")
    with pytest.raises(ValueError, match="only GroupNormConformerEncoder layers can be sliced.*convert-norm"):
        extract(stock, DropoutPlan.flat(3, 0.5))


@pytest.mark.integration
def test_freeze_spec_names_what_clients_keep_fixed(ctc):
    from nemo_layerfx.fd import FreezeSpec

    names = [n for n, _ in ctc.named_parameters()]
    front = FreezeSpec(names=("front_end",)).frozen(ctc)
    assert front and front == {n for n in names if n.startswith("encoder.pre_encode.")}  # the preprocessor has none
    conv = FreezeSpec(modules=("conv",)).frozen(ctc)
    assert conv == {n for n in names if n.startswith("encoder.layers.") and (".conv." in n or ".norm_conv." in n)}
    assert len(conv) > 4
    ffn = FreezeSpec(modules=("ffn",)).frozen(ctc)
    assert {n.split(".")[3] for n in ffn} == {"feed_forward1", "feed_forward2", "norm_feed_forward1",
                                              "norm_feed_forward2"}
    report = {"units": ["layers.0", "layers.1", "layers.2"], "delta_wer": {"rerand": [0.5, 0.01, 0.2]}}
    amb = FreezeSpec(blocks={"report": report, "n": 1, "target": "ambient"}).frozen(ctc)
    crit = FreezeSpec(blocks={"report": report, "n": 1, "target": "critical"}).frozen(ctc)
    assert amb == {n for n in names if n.startswith("encoder.layers.1.")}
    assert crit == {n for n in names if n.startswith("encoder.layers.0.")}
    assert FreezeSpec(names=("front_end",), modules=("conv",)).frozen(ctc) == front | conv  # they add up
    assert not FreezeSpec() and FreezeSpec.from_dict({}).frozen(ctc) == set()
    with pytest.raises(ValueError, match="no parameter of the model starts with 'encoder.nope.'"):
        FreezeSpec(names=("encoder.nope",)).frozen(ctc)
    with pytest.raises(ValueError, match="freezes every parameter"):
        FreezeSpec(names=("encoder", "decoder")).frozen(ctc)
    with pytest.raises(ValueError, match="the report ranks 2 layers but the encoder has n_layers=3"):
        FreezeSpec(blocks={"report": {"units": ["layers.0", "layers.1"], "delta_wer": {"rerand": [0.5, 0.1]}},
                           "n": 1}).frozen(ctc)
    with pytest.raises(ValueError, match="unknown freeze key"):
        FreezeSpec.from_dict({"layers": [0]})
    with pytest.raises(ValueError, match="give report, n and target"):
        FreezeSpec(blocks={"n": 2})
    with pytest.raises(ValueError, match="mlp"):
        FreezeSpec(modules=("mlp",))


@pytest.mark.integration
def test_partial_variable_training_changes_only_the_trained_tensors(ctc, corpus):
    from nemo_layerfx.fd import FreezeSpec, freeze_
    from nemo_layerfx.fl.task import FLConfig, train_submodel

    sub, units = extract(ctc, DropoutPlan.flat(3, 0.5, kinds=ALL), seed=0)
    spec = FreezeSpec(names=("front_end",), modules=("conv",))
    trained = freeze_(sub, spec)
    before = {k: v.clone() for k, v in sub.state_dict().items()}
    train_submodel(sub, corpus / "train_manifest.json", FLConfig(model="unused.nemo", corpus=str(corpus),
                                                                 batch_size=4, local_steps=2), seed=0)
    after = sub.state_dict()
    frozen = spec.frozen(sub)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    # the server folds back only what clients trained: the update has no frozen tensor, and FedAvg leaves them
    state = ctc.state_dict()
    delta = aggregate(state, [({k: after[k] for k in trained}, units, 5.0)], ctc, keys=trained)
    assert set(delta) == set(trained)
    new = {k: v.clone() for k, v in state.items()}
    ServerOptimizer("fedavg").step_(new, delta)
    assert all(torch.equal(new[k], state[k]) for k in frozen)
    assert any(not torch.equal(new[k], state[k]) for k in trained)
    with pytest.raises(ValueError, match="client state lacks"):  # a client that left out a trained tensor
        aggregate(state, [({k: after[k] for k in trained[1:]}, units, 5.0)], ctc, keys=trained)
