"""Layer reduction (Tian et al.): shared layers, sampled depth, any-depth inference, unshare, the depth sweep."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import open_dict

import nemo_layerfx  # noqa: F401
from nemo_layerfx.depth import DepthSampler, DepthSampling, depth_sweep, set_inference_depth, unshare
from nemo_layerfx.encoder import GroupNormConformerEncoder, stock_encoder_config
from nemo_layerfx.evaluate import evaluate_wer
from nemo_layerfx.fd import DropoutPlan, extract
from nemo_layerfx.importance import ProbeConfig, probe
from nemo_layerfx.models import count_params, restore
from nemo_layerfx.train import model_class, train


def encoder(n_layers=8, share=None, seed=0, **kw):
    torch.manual_seed(seed)
    return GroupNormConformerEncoder(feat_in=20, n_layers=n_layers, d_model=32, n_heads=4, conv_norm_type="group_norm4",
                                     conv_kernel_size=5, share_layers=share, dropout=0.0, dropout_pre_encoder=0.0,
                                     dropout_emb=0.0, dropout_att=0.0, **kw)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 20, 64, generator=g), torch.tensor([64, 50, 21])


def layer_calls(enc) -> list[int]:
    """Indices (into enc.layer_sets or enc.layers) of the layer modules each forward call ran."""
    calls: list[int] = []
    modules = list(getattr(enc, "layer_sets", enc.layers))
    for k, m in enumerate(modules):
        m.register_forward_hook(lambda mod, inp, out, k=k: calls.append(k))
    return calls


@pytest.mark.unit
def test_shared_parameters_exist_once_and_are_updated_once_per_step():
    shared, full = encoder(share=1), encoder()
    layer_params = lambda e: sum(p.numel() for layer in {id(x): x for x in e.layers}.values()  # noqa: E731
                                 for p in layer.parameters())
    assert layer_params(shared) * 8 == layer_params(full)  # exactly 1/8 of the encoder-layer parameters
    assert not any(k.startswith("layers.") for k in shared.state_dict())
    assert {k.split(".")[1] for k in shared.state_dict() if k.startswith("layer_sets.")} == {"0"}
    assert all(layer is shared.layer_sets[0] for layer in shared.layers) and len(shared.layers) == 8
    opt = torch.optim.SGD(shared.parameters(), lr=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count_params(shared)
    shared.train()
    w = shared.layer_sets[0].feed_forward1.linear1.weight
    before = w.detach().clone()
    shared(audio_signal=batch()[0], length=batch()[1])[0].square().mean().backward()
    grad = w.grad.clone()  # the sum over the 8 depths that used it
    opt.step()
    torch.testing.assert_close(w.detach(), before - 0.1 * grad, rtol=0, atol=1e-7)  # one update, not eight


@pytest.mark.unit
def test_groups_of_consecutive_layers_share():
    enc = encoder(n_layers=6, share=2)
    assert [enc.layers[i] is enc.layer_sets[0] for i in range(6)] == [True] * 3 + [False] * 3
    assert len({id(m) for m in enc.layers}) == 2


@pytest.mark.unit
@pytest.mark.parametrize("share", [None, 1])
def test_sampled_depth_runs_only_the_first_n_layers(share):
    enc = encoder(share=share, depth_sampling={"low": 2, "high": 8, "seed": 4})
    calls = layer_calls(enc)
    enc.train()
    for step in range(6):
        enc.extension("depth_sampling").step = step
        del calls[:]
        enc(audio_signal=batch()[0], length=batch()[1])
        n = DepthSampler(2, 8, 4).draw(step)
        assert calls == ([0] * n if share == 1 else list(range(n)))  # computed, not masked: no call past N
    enc.eval()
    del calls[:]
    enc(audio_signal=batch()[0], length=batch()[1])
    assert len(calls) == 8  # no sampling at inference


@pytest.mark.unit
def test_depth_sequence_is_a_function_of_seed_and_step():
    a, b, c = DepthSampler(2, 8, seed=7), DepthSampler(2, 8, seed=7), DepthSampler(2, 8, seed=8)
    seq = [a.draw(t) for t in range(200)]
    assert seq == [b.draw(t) for t in range(200)] and seq != [c.draw(t) for t in range(200)]
    assert set(seq) == set(range(2, 9))  # inclusive of both ends
    assert abs(sum(seq) / len(seq) - 5.0) < 0.5  # E[N] = (L + H) / 2


@pytest.mark.unit
def test_inference_depth_equals_a_model_built_with_that_many_layers():
    full, short = encoder(n_layers=6), encoder(n_layers=3)
    short.load_state_dict({k: v for k, v in full.state_dict().items() if short.state_dict().get(k) is not None})
    full.set_inference_depth(3)
    x, lengths = batch()
    out, out_len = full.eval()(audio_signal=x, length=lengths)
    ref, ref_len = short.eval()(audio_signal=x, length=lengths)
    assert torch.equal(out, ref) and torch.equal(out_len, ref_len)
    full.train()  # training runs every layer (no sampler): the inference depth is an eval-mode setting
    assert full.active_depth() == 6


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, message", [
    ({"share_layers": 0}, r"share_layers=0 must be in 1..n_layers=8"),
    ({"share_layers": 9}, r"share_layers=9 must be in 1..n_layers=8"),
    ({"inference_depth": 0}, r"inference_depth=0 must be in 1..n_layers=8"),
    ({"inference_depth": 9}, r"inference_depth=9 must be in 1..n_layers=8"),
    ({"depth_sampling": {"low": 5, "high": 3}}, r"needs 1 <= low <= high <= n_layers=8"),
    ({"depth_sampling": {"low": 0, "high": 3}}, r"needs 1 <= low <= high <= n_layers=8"),
    ({"depth_sampling": {"low": 2, "high": 9}}, r"needs 1 <= low <= high <= n_layers=8"),
    ({"depth_sampling": {"low": 2}}, r"depth_sampling must be \{low: L, high: H\}"),
    ({"depth_sampling": {"low": 2, "high": 8}, "att_context_style": "chunked_limited", "att_context_size": [16, 0]},
     r"depth_sampling cannot be combined with cache-aware streaming"),
])
def test_bad_depth_settings_are_clear_errors(kwargs, message):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=message):
        GroupNormConformerEncoder(feat_in=20, n_layers=8, d_model=32, n_heads=4, conv_norm_type="group_norm4",
                                  conv_kernel_size=5, **kwargs)


def shared_cfg(tiny_cfg, name="conformer_gn_shared_tiny", *extra):
    return tiny_cfg(name, "model.encoder.n_layers=4", "model.encoder.depth_sampling.high=4", *extra)


class CallsPerBatch(pl.Callback):
    """Layer calls of every training micro-batch, with the optimizer step it belonged to."""

    def __init__(self, enc):
        self.calls, self.rows = layer_calls(enc), []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        del self.calls[:]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append((batch_idx, len(self.calls)))


@pytest.mark.integration
def test_one_depth_per_optimizer_step_under_gradient_accumulation(tiny_cfg, tmp_path):
    cfg = shared_cfg(tiny_cfg, "conformer_gn_shared_tiny", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2",
                     "model.train_ds.batch_size=4", "model.encoder.depth_sampling.low=1",
                     "model.encoder.depth_sampling.seed=5", f"layerfx.save_to={tmp_path}/m.nemo")
    torch.manual_seed(0)
    probe_model = model_class(cfg)(cfg=cfg.model)
    counter = CallsPerBatch(probe_model.encoder)

    class Swap(pl.Callback):  # count calls on the very model the trainer fits
        def setup(self, trainer, module, stage):
            counter.calls = layer_calls(module.encoder)

    model = train(cfg, extra_callbacks=[Swap(), counter])
    recorder = next(cb for cb in model.trainer.callbacks if isinstance(cb, DepthSampling))  # the config's
    sampler = DepthSampler(1, 4, seed=5)
    steps = [s for s, _ in recorder.history]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]  # two micro-batches per optimizer step
    assert [d for _, d in recorder.history] == [sampler.draw(s) for s in steps]
    assert [n for _, n in counter.rows] == [sampler.draw(s) for s in steps]  # layers really run = the draw
    assert model.trainer.global_step == 4


@pytest.mark.integration
@pytest.mark.parametrize("name", ["conformer_gn_transducer_tiny", "conformer_gn_hybrid_tiny"])
def test_rnnt_and_hybrid_train_with_shared_sampled_depth(tiny_cfg, name):
    cfg = tiny_cfg(name, "model.encoder.n_layers=4", "+model.encoder.share_layers=1",
                   "+model.encoder.depth_sampling={low: 1, high: 4}",
                   "+trainer.callbacks=[{_target_: nemo_layerfx.depth.DepthSampling}]")
    torch.manual_seed(0)
    model = train(cfg)
    assert model.trainer.global_step == 2 and model.encoder.share_layers == 1
    assert any(type(cb).__name__ == "DepthSampling" for cb in model.trainer.callbacks)


@pytest.mark.integration
def test_missing_callback_is_a_clear_error(tiny_cfg):
    cfg = shared_cfg(tiny_cfg, "conformer_gn_shared_tiny", "~trainer.callbacks")
    with pytest.raises(RuntimeError, match=r"add \{_target_: nemo_layerfx.depth.DepthSampling\} to trainer.callbacks"):
        train(cfg)


@pytest.fixture
def shared_model(tiny_cfg):
    cfg = shared_cfg(tiny_cfg, "conformer_gn_shared_tiny", "model.encoder.share_layers=2")
    torch.manual_seed(0)
    model = model_class(cfg)(cfg=cfg.model).eval()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.03 * torch.randn_like(p))
    return model


def encode(model):
    g = torch.Generator().manual_seed(0)
    audio, lengths = torch.randn(3, 16000, generator=g), torch.tensor([16000, 11000, 7000])
    model.eval()
    with torch.no_grad():
        return model(input_signal=audio, input_signal_length=lengths)[0]


@pytest.mark.integration
def test_unshare_is_exact_and_round_trips(shared_model, tmp_path, capsys):
    from nemo_layerfx_cli import main as layerfx

    shared_path, plain_path = tmp_path / "shared.nemo", tmp_path / "plain.nemo"
    set_inference_depth(shared_model, 3)
    shared_model.save_to(str(shared_path))
    again = restore(shared_path)
    assert again.encoder.share_layers == 2 and again.encoder.inference_depth == 3
    assert torch.equal(encode(again), encode(shared_model))
    assert layerfx(["unshare", str(shared_path), str(plain_path)]) == 0
    plain = restore(plain_path)
    assert plain.encoder.share_layers is None and "share_layers" not in plain.cfg.encoder
    assert len({id(m) for m in plain.encoder.layers}) == 4
    assert torch.equal(encode(plain), encode(shared_model))  # identical outputs (inference depth 3 kept)
    assert plain_path.stat().st_size > shared_path.stat().st_size  # shared parameters are stored once
    stock_cfg = plain.cfg.copy()  # it goes to stock NeMo the usual way: swap the encoder _target_ back
    with open_dict(stock_cfg):
        stock_cfg.encoder.pop("inference_depth")
        stock_cfg.encoder = stock_encoder_config(stock_cfg.encoder)
    stock = restore(plain_path, override_config=stock_cfg, strict=True)
    assert type(stock.encoder).__name__ == "ConformerEncoder"
    assert layerfx(["unshare", str(plain_path), str(tmp_path / "x.nemo")]) == 2
    assert "nothing to unshare" in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists()


@pytest.mark.integration
def test_shared_models_are_refused_by_extract_and_probe(shared_model, corpus):
    with pytest.raises(ValueError, match=r"shares parameters between layers \(share_layers=2\).*unshare it first"):
        extract(shared_model, DropoutPlan.flat(4, 0.5))
    with pytest.raises(ValueError, match=r"shares parameters between layers.*probe the unshared copy"):
        probe(shared_model, corpus / "dev_manifest.json", ProbeConfig())
    plain = unshare(shared_model)
    sub, _ = extract(plain, DropoutPlan.flat(4, 0.5))  # after unsharing, both work
    assert count_params(sub) < count_params(plain)


def uneven_model(tiny_cfg):
    """A 3-layer CTC model whose depths differ (its layers perturbed away from the initialization), and its config."""
    cfg = tiny_cfg("conformer_gn_tiny", "model.encoder.n_layers=3")
    torch.manual_seed(0)
    model = model_class(cfg)(cfg=cfg.model).eval()
    with torch.no_grad():
        for p in model.encoder.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, cfg


@pytest.mark.integration
def test_sweep_matches_full_and_truncated_evaluation(tiny_cfg, corpus, tmp_path, capsys):
    from nemo_layerfx_cli import main as layerfx

    model, cfg = uneven_model(tiny_cfg)
    manifest = corpus / "dev_manifest.json"
    report = depth_sweep(model, manifest, batch_size=4)
    assert report.depths == [1, 2, 3] and len(report.l2) == len(report.cosine) == 2
    assert report.wer[-1] == evaluate_wer(model, manifest, batch_size=4)  # exactly the full evaluation
    set_inference_depth(model, 2)
    assert report.wer[1] == evaluate_wer(model, manifest, batch_size=4)  # and exactly SLI(2)
    assert all(r > 0 for r in report.rtf) and report.rtf[0] < report.rtf[-1]
    assert all(-1 <= c <= 1 for c in report.cosine) and all(d > 0 for d in report.l2)
    set_inference_depth(model, None)
    src = tmp_path / "model.nemo"
    model.save_to(str(src))
    probe_json = tmp_path / "probe.json"
    probe(model, manifest, ProbeConfig()).to_json(probe_json)
    assert layerfx(["depth-sweep", str(src), "--manifest", str(manifest), "--probe", str(probe_json),
                    "--out", str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert "probe dWER rerand" in printed and (tmp_path / "sweep" / "depth_sweep.png").is_file()
    saved = json.loads((tmp_path / "sweep" / "depth_sweep.json").read_text())
    assert saved["wer"][-1] == pytest.approx(report.wer[-1])
    delta = json.loads(probe_json.read_text())["delta_wer"]["rerand"]
    rows = [line.split() for line in printed.splitlines() if line.split() and line.split()[0] in ("1", "2", "3")]
    assert [float(r[-1]) for r in rows] == pytest.approx(delta, abs=1e-4)  # layer M-1's change beside depth M

    # a report that cannot sit beside the sweep is refused before it runs, by name: a module report (parts of a
    # layer, the probe's --unit module) and one of a deeper model
    bad = json.loads(probe_json.read_text())
    for units, message in (([f"layers.{i}.{m}" for i in range(3) for m in ("ffn1", "attn")], "rates modules"),
                           ([f"layers.{i}" for i in range(5)], "not the blocks")):
        (tmp_path / "bad.json").write_text(json.dumps({**bad, "units": units,
                                                       "delta_wer": {"rerand": [0.1] * len(units)}}))
        assert layerfx(["depth-sweep", str(src), "--manifest", str(manifest), "--probe", str(tmp_path / "bad.json"),
                        "--out", str(tmp_path / "bad_sweep")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad_sweep").exists()
    with pytest.raises(ValueError, match=r"no 'reinit' results \(it has: \['rerand'\]\)"):
        report.table(str(probe_json), mode="reinit")


@pytest.mark.integration
def test_transcribe_honours_the_inference_depth_and_the_sweep_runs_on_stock_nemo(tiny_cfg, corpus):
    model, cfg = uneven_model(tiny_cfg)
    short_cfg = cfg.copy()  # the same weights in a model built with 2 layers
    with open_dict(short_cfg):
        short_cfg.model.encoder.n_layers = 2
    short = model_class(short_cfg)(cfg=short_cfg.model).eval()
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.layers.2.")}
    assert short.load_state_dict(kept, strict=True)
    files = [str(corpus / r) for r in [json.loads(line)["audio_filepath"]
                                       for line in (corpus / "dev_manifest.json").read_text().splitlines()[:4]]]

    def texts(m):
        return [h.text if hasattr(h, "text") else h for h in m.transcribe(files, batch_size=2, verbose=False)]

    full_hyps = texts(model)
    set_inference_depth(model, 2)
    shallow = texts(model)
    assert shallow == texts(short) and shallow != full_hyps
    # the sweep on NeMo's own ConformerEncoder: its last depth is the model's full evaluation, exactly
    stock_cfg = tiny_cfg("conformer_gn_tiny", "model.encoder._target_=nemo.collections.asr.modules.ConformerEncoder",
                         "model.encoder.conv_norm_type=batch_norm", "model.encoder.n_layers=3")
    stock = model_class(stock_cfg)(cfg=stock_cfg.model).eval()
    report = depth_sweep(stock, corpus / "dev_manifest.json", batch_size=4)
    assert report.depths == [1, 2, 3] and len(report.cosine) == 2
    assert report.wer[-1] == evaluate_wer(stock, corpus / "dev_manifest.json", batch_size=4)


@pytest.mark.integration
def test_probe_honours_the_inference_depth(tiny_cfg, corpus):
    model, _ = uneven_model(tiny_cfg)
    manifest = corpus / "dev_manifest.json"
    sweep = depth_sweep(model, manifest)  # loss at depths 1, 2, 3: they differ
    set_inference_depth(model, 2)
    report = probe(model, manifest, ProbeConfig())
    assert report.units == ["layers.0", "layers.1"] and report.config["depth"] == 2
    assert report.baseline_wer == evaluate_wer(model, manifest, batch_size=16)
    # the baseline is the model at depth 2, not its 3 layers (the WERs of an untrained model agree; the losses not)
    assert report.baseline_loss == pytest.approx(sweep.loss[1], rel=1e-5)
    assert report.baseline_loss != pytest.approx(sweep.loss[2], rel=1e-3)


@pytest.mark.unit
def test_masking_predictor_and_l1_loss_follow_the_paper():
    from nemo_layerfx.depth.ssl import BlockTimeMasking, LinearReconstructionDecoder, MaskedReconstructionLoss

    torch.manual_seed(0)
    spec = torch.randn(2, 80, 300) + 3.0  # no exact zeros
    masked = BlockTimeMasking(block=7, fraction=0.15)(input_spec=spec, length=torch.tensor([300, 140]))
    zero = (masked == 0).all(dim=1)  # (B, T) masked frames
    assert zero[0].sum() == 7 * round(0.15 * 300 / 7) and zero[1].sum() == 7 * round(0.15 * 140 / 7)
    assert not zero[1, 140:].any()  # nothing beyond the utterance
    dec = LinearReconstructionDecoder(feat_in=32, feat_out=80, subsampling=4)
    assert sum(p.numel() for p in dec.parameters()) == 32 * 320 + 320  # one linear layer
    out = dec(encoder_output=torch.randn(2, 32, 75))
    assert out.shape == (2, 300, 80)
    spec[1, :, 140:] = 0.0  # padded frames, as NeMo's preprocessor writes them
    masks = torch.zeros_like(spec)
    masks[:, :, 10:17] = 1.0
    for masked_only in (False, True):
        loss = MaskedReconstructionLoss(masked_only)(spectrograms=spec, spec_masks=masks, decoder_outputs=out,
                                                     decoder_lengths=torch.tensor([75, 35]))
        err = (out - spec.transpose(1, 2)).abs().mean(dim=2)
        frames = torch.zeros(2, 300, dtype=torch.bool)
        frames[0, :] = True
        frames[1, :140] = True
        if masked_only:
            frames[:, :10] = frames[:, 17:] = False
        torch.testing.assert_close(loss, err[frames].mean())


@pytest.mark.integration
def test_masked_reconstruction_pretraining_then_ctc_fine_tuning(tiny_cfg, corpus, tmp_path):
    small = ["model.encoder.n_layers=4", "model.encoder.depth_sampling.high=4"]
    hist = tmp_path / "loss.json"
    ssl = tiny_cfg("conformer_gn_shared_ssl_tiny", *small, "trainer.max_steps=25", "trainer.max_epochs=100",
                   "++trainer.limit_train_batches=1", "++trainer.limit_val_batches=0", "model.train_ds.shuffle=false",
                   "model.optim.lr=2.0", "model.optim.sched.warmup_steps=5", f"layerfx.save_to={tmp_path}/ssl.nemo",
                   f"trainer.callbacks=[{{_target_: nemo_layerfx.depth.DepthSampling}}, "
                   f"{{_target_: nemo_layerfx.callbacks.LossHistory, path: '{hist}'}}]")
    torch.manual_seed(0)
    pretrained = train(ssl)
    assert type(pretrained).__name__ == "SpeechEncDecSelfSupervisedModel"
    losses = json.loads(hist.read_text())["loss"]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # the L1 reconstruction loss falls (-13 % seen)
    for frozen in (True, False):
        cfg = tiny_cfg("conformer_gn_shared_finetune_tiny", *small,
                       f"init_from_nemo_model.encoder.path={tmp_path}/ssl.nemo",
                       f"model.freeze_updates.enabled={str(frozen).lower()}")
        model = train(cfg)
        same = [torch.equal(v, model.encoder.state_dict()[k]) for k, v in pretrained.encoder.state_dict().items()]
        assert all(same) if frozen else not all(same)  # frozen: the pretrained encoder as loaded; else trained on
    with pytest.raises(FileNotFoundError, match="init_from_nemo_model.encoder.path: no such .nemo file"):
        train(tiny_cfg("conformer_gn_shared_finetune_tiny", *small, f"init_from_nemo_model.encoder.path={tmp_path}/x"))
