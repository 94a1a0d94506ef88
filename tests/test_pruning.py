"""Adaptive-dropout pruning (Kubo et al.): the estimator, the schedule and regularizer, exact physical pruning of
CTC / RNNT / hybrid models at every location, parameter arithmetic, .nemo round trips, composition, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import encoded, features
from omegaconf import OmegaConf, open_dict

import nemo_layerfx  # noqa: F401
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo_layerfx.encoder import GroupNormConformerEncoder, stock_encoder_config
from nemo_layerfx.fd import DropoutPlan, extract
from nemo_layerfx.models import count_params, restore
from nemo_layerfx.pruning import (
    AdaptiveDropout, AdaptiveDropoutConfig, add_gates, as_probe_report, effective_params, gates_of, prune,
    regularizer, remove_gates, survival_report,
)
from nemo_layerfx.pruning.gates import _HardSigmoidST
from nemo_layerfx.train import model_class, train

WIDE = ["model.encoder.n_heads=4", "model.encoder.n_layers=2"]  # d_model 32: 4 heads of 8, 4 GN groups of 8


@pytest.mark.unit
def test_forward_is_hard_and_backward_is_the_sigmoids_gradient():
    z = torch.tensor([-3.0, -0.2, 0.0, 0.4, 5.0], requires_grad=True)
    m = _HardSigmoidST.apply(z)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    w = torch.tensor([1.0, -2.0, 3.0, 0.5, 2.0])
    (m * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (torch.sigmoid(z2) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=0, atol=0)


@pytest.mark.unit
def test_gate_mask_estimator_schedule_and_regularizer_match_the_closed_forms():
    from nemo_layerfx.pruning.gates import GateSchedule, RetentionGate

    cfg = AdaptiveDropoutConfig(steps=100)
    assert [cfg.target(t) for t in (0, 25, 100, 500)] == [10.0, 7.0, -2.0, -2.0]  # linear, then constant
    assert cfg.scale == pytest.approx(10.0)  # sqrt(gamma / alpha) with the paper's values
    schedule = GateSchedule(cfg)
    schedule.step.fill_(25)
    gate = RetentionGate(6, 1, schedule)
    with torch.no_grad():
        gate.beta_prime.copy_(torch.tensor([-1.5, -0.95, -0.8, -0.5, 0.0, 0.3]))  # β = 10 b' + 7
    torch.manual_seed(3)
    m = gate.mask()  # training: hard, sampled
    assert set(m.tolist()) <= {0.0, 1.0}
    (m * torch.arange(1.0, 7.0)).sum().backward()
    torch.manual_seed(3)
    u = torch.rand(6).clamp_(1e-6, 1 - 1e-6)
    b2 = gate.beta_prime.detach().clone().requires_grad_(True)
    (torch.sigmoid(10 * b2 + 7 + torch.log(u) - torch.log1p(-u)) * torch.arange(1.0, 7.0)).sum().backward()
    torch.testing.assert_close(gate.beta_prime.grad, b2.grad)  # the gradient of σ(β + ε), same ε
    gate.eval()
    assert gate.mask().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # deterministic: β >= c_inf = -2
    # R(β; t) = α Σ (β − c(t))² equals γ ||β'||² under the reparametrization
    r = cfg.alpha * ((gate.beta() - schedule.target()) ** 2).sum()
    torch.testing.assert_close(r, cfg.gamma * (gate.beta_prime ** 2).sum())


def gated(tiny_cfg, name="conformer_gn_tiny", locations=("ffn", "qk", "v", "conv"), *extra):
    cfg = tiny_cfg(name, *WIDE, f"+model.encoder.adaptive_dropout={{locations: [{', '.join(locations)}], steps: 10}}",
                   *extra)
    torch.manual_seed(0)
    model = model_class(cfg)(cfg=cfg.model).eval()
    model.encoder.adaptive_dropout_schedule.step.fill_(10)  # c(t) = c_inf
    with torch.no_grad():  # a trained-looking model: about half of every kind below the threshold
        for p in model.encoder.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for layer in gates_of(model):
            for g in layer.values():
                g.beta_prime.normal_(0.0, 0.3)
                g.beta_prime[0] = 0.5  # one unit of each kind stays open: min_units never overrides the gates here
    return model


def encode(model):
    return encoded(model)[0]  # on a padded batch


@pytest.mark.integration
@pytest.mark.parametrize("name", ["conformer_gn_tiny", "conformer_gn_transducer_tiny", "conformer_gn_hybrid_tiny"])
@pytest.mark.parametrize("locations", [("ffn",), ("qk",), ("v",), ("conv",), ("ffn", "qk", "v", "conv")])
def test_pruned_model_equals_the_gated_model(tiny_cfg, name, locations):
    model = gated(tiny_cfg, name, locations)
    small, report = prune(model)
    assert type(small) is type(model) and "adaptive_dropout" not in small.cfg.encoder
    torch.testing.assert_close(encode(small), encode(model), rtol=1e-5, atol=1e-5)
    assert count_params(small) == report.params_after < report.params_before
    assert report.params_after == effective_params(model) and report.notes == []
    dense = remove_gates(model)
    assert (encode(dense) - encode(model)).abs().max() > 1e-3  # the removed units did matter


def closed_form_params(model, d_model=32, kernel=15, group=8) -> int:
    """Parameters of the pruned model, written out from the kept counts independently of the library."""
    total = count_params(remove_gates(model))
    c_inf = model.encoder.adaptive_dropout_schedule.config.c_inf
    for layer in gates_of(model):
        dropped = {k: int((g.beta() < c_inf).sum()) for k, g in layer.items()}
        total -= (dropped.get("ffn1", 0) + dropped.get("ffn2", 0)) * (2 * d_model + 1)  # W1 row, b1, W2 column
        total -= dropped.get("qk", 0) * (3 * d_model + 4)  # Q, K, pos rows; q and k biases; u and v entries
        total -= dropped.get("v", 0) * (2 * d_model + 1)  # V row and bias, linear_out column
        total -= dropped.get("conv", 0) * group * (3 * d_model + kernel + 5)  # GLU rows+biases, dw, GN, pw2 column
    return total


@pytest.mark.integration
def test_parameter_counts_equal_the_unit_maps_arithmetic(tiny_cfg):
    model = gated(tiny_cfg, "conformer_gn_tiny", ("ffn", "qk", "v", "conv"), "model.encoder.conv_kernel_size=15")
    small, _ = prune(model)
    assert count_params(small) == effective_params(model) == closed_form_params(model)


@pytest.mark.integration
def test_gated_and_pruned_models_round_trip_as_nemo(tiny_cfg, tmp_path, capsys):
    from nemo_layerfx_cli import main as layerfx

    model = gated(tiny_cfg)
    src, dst = tmp_path / "gated.nemo", tmp_path / "pruned.nemo"
    model.save_to(str(src))
    again = restore(src)
    assert int(again.encoder.adaptive_dropout_schedule.step) == 10  # the step travels: c(t) and the threshold too
    torch.testing.assert_close(encode(again), encode(model), rtol=0, atol=0)
    assert layerfx(["prune", str(src), str(dst), "--report", str(tmp_path / "survival")]) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "layers.0: ffn1" in printed and "qk" in printed
    assert (tmp_path / "survival" / "survival.png").is_file()
    pruned = restore(dst)
    assert len(pruned.cfg.encoder.layer_qk_dims[0]) == 4  # every head kept, with its own width
    torch.testing.assert_close(encode(pruned), encode(model), rtol=1e-5, atol=1e-5)
    assert layerfx(["prune", str(dst), str(tmp_path / "x.nemo")]) == 2
    assert "the model has no adaptive_dropout gates" in capsys.readouterr().err
    assert layerfx(["prune", str(src), str(src)]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists()


@pytest.mark.integration
def test_min_units_keeps_the_largest_gates_and_says_so(tiny_cfg):
    model = gated(tiny_cfg, "conformer_gn_tiny", ("ffn",))
    with torch.no_grad():
        model.encoder.layers[0].adaptive_dropout.ffn1.beta_prime.fill_(-1.0)  # every unit closed
        model.encoder.layers[0].adaptive_dropout.ffn1.beta_prime[7] = -0.5  # the largest β
    small, report = prune(model)
    assert small.cfg.encoder.ff_hidden[0][0] == 1
    assert any("layers.0.ffn1: every unit is below c_inf; kept the 1" in n for n in report.notes)


@pytest.mark.integration
def test_pruning_before_the_schedule_ends_says_so(tiny_cfg):
    model = gated(tiny_cfg, "conformer_gn_tiny", ("ffn",))
    assert not any("schedule" in n for n in prune(model)[1].notes)  # step K: c(t) = c_inf
    model.encoder.adaptive_dropout_schedule.step.fill_(4)  # c(t) = 10 - 0.4 * 12 = 5.2
    report = prune(model)[1]
    assert any("step 4 of K = 10 (c(t) = +5.20, not yet c_inf = -2)" in n for n in report.notes)
    assert any("step 4 of K = 10" in line for line in report.lines())


@pytest.mark.integration
@pytest.mark.parametrize("optimizer, mode, decay", [("sgd", "weight_decay", 2e-5), ("adamw", "loss", 0.0)])
def test_regularizer_is_right_with_the_optimizer_used(tiny_cfg, optimizer, mode, decay):
    cfg = tiny_cfg("conformer_gn_adaptive_dropout_tiny", *WIDE, f"model.optim.name={optimizer}",
                   "model.optim.weight_decay=0.5", "~model.optim.betas", "model.encoder.adaptive_dropout.steps=4")
    torch.manual_seed(0)
    model = train(cfg)
    callback = next(cb for cb in model.trainer.callbacks if isinstance(cb, AdaptiveDropout))
    assert callback.mode == mode
    groups = model.trainer.optimizers[0].param_groups
    gate_ids = {id(g.beta_prime) for layer in gates_of(model) for g in layer.values()}
    gate_groups = [g for g in groups if any(id(p) in gate_ids for p in g["params"])]
    assert len(gate_groups) == 1 and all(id(p) in gate_ids for p in gate_groups[0]["params"])
    assert gate_groups[0]["weight_decay"] == pytest.approx(decay)  # 2γ coupled; 0 when R goes through the loss
    assert all(g["weight_decay"] == 0.5 for g in groups if g is not gate_groups[0])  # the others keep theirs
    # loss mode: the callback adds exactly ∇_β′ R (autograd of α Σ (β − c)²)
    with torch.no_grad():
        for layer in gates_of(model):
            for g in layer.values():
                g.beta_prime.normal_()
                g.beta_prime.grad = torch.zeros_like(g.beta_prime)
    callback.mode = "loss"
    callback.on_before_optimizer_step(model.trainer, model, model.trainer.optimizers[0])
    added = [g.beta_prime.grad.clone() for layer in gates_of(model) for g in layer.values()]
    for layer in gates_of(model):
        for g in layer.values():
            g.beta_prime.grad = None
    regularizer(model).backward()
    expected = [g.beta_prime.grad for layer in gates_of(model) for g in layer.values()]
    for a, e in zip(added, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.integration
def test_callback_writes_the_survival_report_and_it_drives_a_dropout_plan(tiny_cfg, tmp_path):
    cfg = tiny_cfg("conformer_gn_adaptive_dropout_tiny", *WIDE, "trainer.max_steps=6", "trainer.max_epochs=10",
                   "model.encoder.adaptive_dropout.steps=3",
                   f"trainer.callbacks=[{{_target_: nemo_layerfx.pruning.AdaptiveDropout, every_n_steps: 2, "
                   f"out_dir: '{tmp_path}'}}]")
    torch.manual_seed(0)
    model = train(cfg)
    saved = json.loads((tmp_path / "survival.json").read_text())
    assert model.trainer.global_step == 6 and saved["step"] == 5 and saved["target"] == -2.0 and set(saved["kinds"]) == {"ffn1", "ffn2", "qk", "v", "conv"}
    assert (tmp_path / "survival.png").is_file()
    history = next(cb for cb in model.trainer.callbacks if isinstance(cb, AdaptiveDropout)).history
    assert [h["step"] for h in history][:2] == [2, 4] and "adaptive_dropout/qk/expected_retention" in history[0]
    report = survival_report(model)
    plan = DropoutPlan.targeted(as_probe_report(report), n=1, rate=0.5, mode="survival")
    lowest = min(range(2), key=lambda i: sum(report.survival[k][i] for k in report.kinds))
    assert plan.rates["ffn"][lowest] == 0.5


@pytest.mark.integration
def test_composition_with_federated_dropout(tiny_cfg):
    model = gated(tiny_cfg)
    with pytest.raises(ValueError, match=r"is a Gated(Input|Output), not a dense layer.*layerfx prune"):
        extract(model, DropoutPlan.flat(2, 0.5))
    small, _ = prune(model)
    sub, _ = extract(small, DropoutPlan.flat(2, 0.5, kinds=("ffn", "conv")))  # a pruned model still slices
    assert count_params(sub) < count_params(small)
    with pytest.raises(ValueError, match="heads have their own widths"):
        extract(small, DropoutPlan.flat(2, 0.5, kinds=("head",)))


@pytest.mark.unit
@pytest.mark.parametrize("spec, message", [
    ({"locations": ["ffn", "mlp"]}, r"unknown adaptive_dropout location\(s\) \['mlp'\]; choose from ffn, qk, v, conv"),
    ({"steps": 0}, r"adaptive_dropout.steps \(K\) must be >= 1"),
    ({"c0": -2.0, "c_inf": -2.0}, r"needs c0 > c_inf"),
    ({"alpha": 0.0}, r"alpha and gamma must be > 0"),
    ({"gamma": -1e-5}, r"alpha and gamma must be > 0"),
    ({"regularizer": "l1"}, r"unknown adaptive_dropout regularizer 'l1'"),
    ({"min_units": 0}, r"min_units must be >= 1"),
])
def test_bad_gate_settings_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        GroupNormConformerEncoder(feat_in=20, n_layers=2, d_model=32, n_heads=4, conv_norm_type="group_norm4",
                                  adaptive_dropout=spec)


@pytest.mark.integration
def test_gates_are_refused_where_pruning_cannot_follow(tiny_cfg):
    with pytest.raises(ValueError, match=r"is a LowRankLinear, not a dense layer.*layerfx merge"):
        GroupNormConformerEncoder(feat_in=20, n_layers=2, d_model=32, n_heads=4, conv_norm_type="group_norm4",
                                  low_rank={"ffn": 0.5}, adaptive_dropout={})
    with pytest.raises(ValueError, match=r"shares parameters between layers"):
        GroupNormConformerEncoder(feat_in=20, n_layers=2, d_model=32, n_heads=4, conv_norm_type="group_norm4",
                                  share_layers=1, adaptive_dropout={})
    cfg = OmegaConf.create(OmegaConf.to_container(tiny_cfg("conformer_gn_tiny", *WIDE).model, resolve=True))
    with open_dict(cfg):
        cfg.encoder = stock_encoder_config(cfg.encoder)
        cfg.encoder.conv_norm_type = "batch_norm"
    with pytest.raises(ValueError, match="a BatchNorm or LayerNorm conv norm has no groups to drop"):
        add_gates(EncDecCTCModelBPE(cfg=cfg), {})  # conv gates need groups; ffn / qk / v gates: tests/test_stock.py
    torch.manual_seed(0)
    dense = model_class(tiny_cfg("conformer_gn_tiny", *WIDE))(cfg=tiny_cfg("conformer_gn_tiny", *WIDE).model)
    with pytest.raises(ValueError, match="the model has no adaptive_dropout gates"):
        prune(dense)
    fine_tune = add_gates(dense, {"steps": 5})  # gates added to a trained dense model start fully open
    feats, flen = features(dense)  # eval mode with gradients: the same (training-path) arithmetic, exactly equal
    exact = [m.eval().encoder(audio_signal=feats, length=flen)[0].detach() for m in (fine_tune, dense)]
    torch.testing.assert_close(exact[0], exact[1], rtol=0, atol=0)
    # inference: the dense model's attention fuses its projections, the gated one's cannot
    torch.testing.assert_close(encode(fine_tune), encode(dense), rtol=1e-5, atol=1e-5)
    assert "adaptive_dropout" in fine_tune.cfg.encoder and "adaptive_dropout" not in dense.cfg.encoder


@pytest.mark.unit
def test_per_head_counts_query_key_dimensions_by_head():
    from nemo_layerfx.units import per_head

    layer = GroupNormConformerEncoder(feat_in=20, n_layers=1, d_model=32, n_heads=4,
                                      conv_norm_type="group_norm4").layers[0]
    assert per_head(layer, "qk", torch.tensor([0, 1, 9, 31])) == [2, 1, 0, 1]  # flat dims -> heads of width 8


@pytest.mark.integration
def test_a_query_key_unit_drops_its_key_and_position_dimensions_together_in_training(tiny_cfg):
    from nemo_layerfx.pruning.gates import GatedOutput

    model = gated(tiny_cfg)
    attn = model.encoder.layers[0].self_attn
    assert isinstance(attn.linear_k, GatedOutput) and isinstance(attn.linear_pos, GatedOutput)
    dropped = {}

    def record(name):
        def hook(module, args, out):  # channels the gate zeroed: where the ungated projection is not zero
            base = module.base_layer(args[0])
            dropped[name] = ((out == 0) & (base != 0)).flatten(0, -2).all(0)
        return hook

    attn.linear_k.register_forward_hook(record("k"))
    attn.linear_pos.register_forward_hook(record("pos"))
    feats, flen = features(model)
    model.encoder.train()
    for seed in range(3):  # every draw: one mask per unit for both projections
        torch.manual_seed(seed)
        model.encoder(audio_signal=feats, length=flen)
        assert 0 < int(dropped["k"].sum()) < dropped["k"].numel()
        assert torch.equal(dropped["k"], dropped["pos"])
    assert "_kept" not in attn.linear_k.gate.__dict__  # the drawn mask does not outlive its forward


@pytest.mark.unit
def test_all_gates_are_drawn_at_once_with_the_same_estimator():
    """GateSchedule.draw: one noise draw for every gate, each unit's mask repeated over its channels, the
    gradient of σ(β + ε) for each gate's β′ (as RetentionGate.mask computes it gate by gate)."""
    from nemo_layerfx.pruning.gates import GateSchedule, RetentionGate

    schedule = GateSchedule(AdaptiveDropoutConfig(steps=100))
    schedule.step.fill_(40)
    gates = [RetentionGate(5, 1, schedule), RetentionGate(3, 4, schedule), RetentionGate(4, 2, schedule)]
    torch.manual_seed(0)
    for g in gates:
        torch.nn.init.normal_(g.beta_prime, 0.0, 0.5)
    torch.manual_seed(7)
    schedule.draw(gates)
    got = [g.channel_mask() for g in gates]
    assert all("_drawn" not in g.__dict__ for g in gates)  # each mask handed out once
    torch.manual_seed(7)
    u = torch.rand(12).clamp_(1e-6, 1 - 1e-6)
    weights = [torch.randn(len(m)) for m in got]
    sum((m * w).sum() for m, w in zip(got, weights)).backward()
    start = 0
    for g, m, w in zip(gates, got, weights):
        b2 = g.beta_prime.detach().clone().requires_grad_(True)
        z = 10 * b2 + schedule.target() + torch.log(u[start:start + g.n]) - torch.log1p(-u[start:start + g.n])
        assert torch.equal(m, (z > 0).float().repeat_interleave(g.width))
        (torch.sigmoid(z).repeat_interleave(g.width) * w).sum().backward()
        torch.testing.assert_close(g.beta_prime.grad, b2.grad)
        start += g.n


@pytest.mark.integration
def test_a_training_step_draws_every_gate_and_leaves_no_mask_behind(tiny_cfg):
    model = gated(tiny_cfg)
    feats, flen = features(model)
    model.encoder.train()
    out, _ = model.encoder(audio_signal=feats, length=flen)
    out.square().mean().backward()
    for layer in gates_of(model):
        for kind, g in layer.items():
            assert g.beta_prime.grad is not None and g.beta_prime.grad.abs().sum() > 0, kind
            assert "_drawn" not in g.__dict__ and "_kept" not in g.__dict__, kind


@pytest.mark.unit
@pytest.mark.parametrize("frames", [3, 400], ids=["short: masks activations", "long: masks the weight"])
def test_wrappers_mask_weight_or_activation_with_the_same_result(frames):
    """Each wrapper masks the smaller of activation and weight; outputs and the mask's gradient are the same."""
    from nemo_layerfx.pruning.gates import GatedInput, GatedOutput, GateSchedule, RetentionGate

    torch.manual_seed(0)
    schedule = GateSchedule(AdaptiveDropoutConfig(steps=10))
    cases = [(GatedInput, torch.nn.Linear(12, 6), 12, -1, torch.randn(2, frames, 12)),
             (GatedOutput, torch.nn.Linear(6, 12), 12, None, torch.randn(2, frames, 6)),
             (GatedInput, torch.nn.Conv1d(12, 6, 1), 12, 1, torch.randn(2, 12, frames))]
    for cls, base, n, dim, x in cases:
        gate = RetentionGate(n, 1, schedule)
        wrapper = cls(base, gate, dim) if cls is GatedInput else cls(base, gate)
        assert (x.numel() > base.weight.numel()) == (frames == 400)
        mask = (torch.rand(n) > 0.4).float().requires_grad_(True)
        gate.__dict__["_drawn"] = mask  # what GateSchedule.draw hands the gate in a training forward
        y = wrapper(x)
        g = torch.randn_like(y)
        (dmask,) = torch.autograd.grad(y, mask, g)
        m2 = mask.detach().clone().requires_grad_(True)
        if cls is GatedOutput:
            ref = base(x) * m2
        else:
            ref = base(x * (m2 if dim == -1 else m2.view(-1, 1)))
        (dref,) = torch.autograd.grad(ref, m2, g)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dmask, dref, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_settled_gates_use_the_eval_mask_in_training():
    """settle_after_k: from step K on, training masks are 1[β ≥ c∞] without a gradient; before K they are sampled."""
    from nemo_layerfx.pruning.gates import GateSchedule, RetentionGate

    schedule = GateSchedule(AdaptiveDropoutConfig(steps=10, settle_after_k=True))
    gates = [RetentionGate(50, 1, schedule), RetentionGate(20, 3, schedule)]
    torch.manual_seed(0)
    for g in gates:
        torch.nn.init.normal_(g.beta_prime, 0.0, 0.3)  # β = 10β′ − 2: about half the units at or above c∞
    schedule.step.fill_(10)  # c(t) = c∞
    eval_masks = [(g.beta() >= -2.0).float().repeat_interleave(g.width) for g in gates]
    assert 0 < sum(m.sum() for m in eval_masks) < sum(len(m) for m in eval_masks)
    for g in gates:
        g.train()
        assert torch.equal(g.mask().repeat_interleave(g.width), eval_masks[gates.index(g)])
    schedule.draw(gates)
    drawn = [g.channel_mask() for g in gates]
    assert all(torch.equal(d, e) and not d.requires_grad for d, e in zip(drawn, eval_masks))
    schedule.step.fill_(9)  # before K: sampled, with the sigmoid's gradient
    schedule.draw(gates)
    drawn = [g.channel_mask() for g in gates]
    assert all(d.requires_grad for d in drawn) and any(not torch.equal(d, e) for d, e in zip(drawn, eval_masks))
    with pytest.raises(ValueError, match="settle_after_k must be true or false"):
        AdaptiveDropoutConfig(settle_after_k="yes")


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_settled_gates_stop_moving_while_the_kept_subnetwork_trains(tiny_cfg, optimizer):
    """After step K the gates' β′ stay exactly where they were (no gradient, no regularizer, no weight decay, also
    with Adam's momentum), so the pruned structure is fixed, while the model's weights keep training."""
    import lightning.pytorch as pl

    class AtK(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                self.betas = [g.beta_prime.detach().clone() for layer in gates_of(pl_module) for g in layer.values()]
                self.weight = pl_module.encoder.layers[0].feed_forward1.linear1.weight.detach().clone()

    cfg = tiny_cfg("conformer_gn_adaptive_dropout_tiny", *WIDE, f"model.optim.name={optimizer}",
                   "model.optim.weight_decay=0.5", "~model.optim.betas", "model.encoder.adaptive_dropout.steps=3",
                   "+model.encoder.adaptive_dropout.settle_after_k=true", "trainer.max_steps=6",
                   "trainer.max_epochs=10")
    torch.manual_seed(0)
    at_k = AtK()
    model = train(cfg, extra_callbacks=[at_k])
    assert model.trainer.global_step == 6
    after = [g.beta_prime.detach() for layer in gates_of(model) for g in layer.values()]
    assert any(b.abs().sum() > 0 for b in at_k.betas)  # the gates trained before K
    assert all(torch.equal(a, b) for a, b in zip(after, at_k.betas))  # and not after
    linear1 = model.encoder.layers[0].feed_forward1.linear1
    assert not torch.equal(getattr(linear1, "base_layer", linear1).weight.detach(), at_k.weight)
