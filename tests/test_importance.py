"""Layer-importance probe: exact against naive evaluation, restores weights, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import nemo_layerfx  # noqa: F401
from nemo.collections.asr.models import EncDecCTCModelBPE, EncDecRNNTBPEModel
from nemo_layerfx.evaluate import audio_batches, batch_loss, decode, encode_prefix, read_manifest, run_layers, wer
from nemo_layerfx.importance import (
    ProbeConfig, fresh_draw, init_state, layer_snapshot, load_snapshot, probe, probe_units, save_snapshot, swapped,
)


def naive_wer(model, manifest, module=None, state=None, with_loss=False):
    """Full forward of the whole model per batch (no caching), with ``module`` temporarily set to ``state``."""
    rows = read_manifest(manifest)
    hyps, refs, loss = [], [], 0.0
    model.eval()
    ctx = swapped(module, state) if module is not None else torch.no_grad()
    with ctx, torch.no_grad():
        for audio, lengths, texts in audio_batches(rows, 16, 16000, "cpu"):
            feats, flen = model.preprocessor(input_signal=audio, length=lengths)
            encoded, enc_len = model.encoder(audio_signal=feats, length=flen)
            hyps += decode(model, encoded, enc_len)
            refs += texts
            loss += batch_loss(model, encoded, enc_len, texts) * len(texts)
    if with_loss:
        return wer(hyps, refs), hyps, loss / len(refs)
    return wer(hyps, refs), hyps


@pytest.fixture
def ctc_model(tiny_cfg):
    torch.manual_seed(0)
    model = EncDecCTCModelBPE(cfg=tiny_cfg("conformer_gn_tiny", "model.encoder.n_layers=3").model)
    init = layer_snapshot(model)
    with torch.no_grad():  # stand-in for training: move every layer away from its init
        for p in model.encoder.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), init


@pytest.mark.integration
def test_prefix_forward_equals_model_forward(ctc_model, corpus):
    model, _ = ctc_model
    rows = read_manifest(corpus / "dev_manifest.json")
    audio, lengths, _ = next(audio_batches(rows, 4, 16000, "cpu"))
    prefix = encode_prefix(model, audio, lengths)
    with torch.no_grad():
        feats, flen = model.preprocessor(input_signal=audio, length=lengths)
        ref, ref_len = model.encoder(audio_signal=feats, length=flen)
        ours = run_layers(model.encoder, prefix, len(model.encoder.layers))
    assert len(prefix.hidden) == len(model.encoder.layers) + 1
    assert torch.equal(prefix.length, ref_len)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.integration
@pytest.mark.parametrize("unit", ["block", "module"])
def test_probe_matches_naive_evaluation_and_restores_weights(ctc_model, corpus, unit):
    model, init = ctc_model
    manifest = corpus / "dev_manifest.json"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ProbeConfig(modes=("reinit", "rerand"), unit=unit, draws=2)
    report = probe(model, manifest, cfg, init=init)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base, base_hyps = naive_wer(model, manifest)
    assert report.baseline_wer == base and len(set(base_hyps)) > 1  # real, varied transcripts
    units = probe_units(model, unit)
    assert report.units == [n for n, _, _ in units]
    for u, (name, idx, module) in enumerate(units):
        w, _, loss = naive_wer(model, manifest, module, init_state(module, idx, init), with_loss=True)
        assert report.wer["reinit"][u] == w and report.loss["reinit"][u] == pytest.approx(loss, rel=1e-6)
        draws = [naive_wer(model, manifest, module, fresh_draw(module, seed=u * 1_009 + d))[0] for d in range(2)]
        assert report.wer["rerand"][u] == pytest.approx(sum(draws) / 2, abs=1e-12)
    assert report.churn is not None and max(report.churn["block"]) == pytest.approx(1.0)
    assert set(report.churn_rank_correlation) == {"reinit", "rerand"}


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["ctc", pytest.param("rnnt", marks=pytest.mark.slow)])
def test_batched_reset_variants_match_one_at_a_time(ctc_model, corpus, tiny_cfg, arch):
    """Several resets of a layer stacked into one batch give the same transcripts and losses as separate passes."""
    if arch == "ctc":  # 4 modules x (1 reinit + 2 rerand draws) = 12 resets per layer -> passes of 7 and 5
        model, init = ctc_model
        kw, group, passes_per_layer = dict(unit="module", draws=2), 7, 2
    else:  # untrained RNNT greedy decoding is slow: whole blocks, 1 + 2 resets per layer -> passes of 2 and 1
        torch.manual_seed(0)
        model = EncDecRNNTBPEModel(cfg=tiny_cfg("conformer_gn_transducer_tiny").model).eval()
        init = layer_snapshot(model)
        kw, group, passes_per_layer = dict(unit="block", draws=2, max_utterances=5), 2, 2
    kw.update(modes=("reinit", "rerand"), batch_size=5)
    one = probe(model, corpus / "dev_manifest.json", ProbeConfig(**kw), init=init)
    passes = []
    batched = probe(model, corpus / "dev_manifest.json", ProbeConfig(**kw, batch_variants=group), init=init,
                    progress=passes.append)
    assert batched.wer == one.wer and batched.baseline_wer == one.baseline_wer
    for mode in one.loss:
        assert batched.loss[mode] == pytest.approx(one.loss[mode], rel=1e-5)
    n_batches = -(-batched.utterances // 5)
    assert len(passes) == n_batches * len(model.encoder.layers) * passes_per_layer
    with pytest.raises(ValueError, match="batch_variants must be >= 1"):
        ProbeConfig(batch_variants=0)


@pytest.mark.integration
def test_probe_on_rnnt_model(tiny_cfg, corpus, tmp_path):
    torch.manual_seed(0)
    model = EncDecRNNTBPEModel(cfg=tiny_cfg("conformer_gn_transducer_tiny").model)
    report = probe(model, corpus / "dev_manifest.json", ProbeConfig(n_ambient=1))
    assert len(report.units) == 2 and len(report.ambient["rerand"]) == 1
    _, _, loss = naive_wer(model, corpus / "dev_manifest.json", with_loss=True)
    assert report.baseline_loss == pytest.approx(loss, rel=1e-6) and report.baseline_loss > 0
    report.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["units"] == ["layers.0", "layers.1"]


@pytest.mark.integration
def test_interrupted_probe_leaves_weights_restored(ctc_model, corpus):
    model, init = ctc_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def stop_midway(msg):
        calls.append(msg)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe(model, corpus / "dev_manifest.json", ProbeConfig(modes=("reinit",)), init=init, progress=stop_midway)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.integration
def test_rerand_draw_is_seeded_and_leaves_global_rng_alone(ctc_model):
    model, _ = ctc_model
    layer = model.encoder.layers[1]
    state = torch.random.get_rng_state()
    a, b, c = fresh_draw(layer, 5), fresh_draw(layer, 5), fresh_draw(layer, 6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["feed_forward1.linear1.weight"], c["feed_forward1.linear1.weight"])
    assert torch.all(a["self_attn.pos_bias_u"] == 0) and torch.all(a["norm_out.weight"] == 1)


@pytest.mark.integration
def test_snapshot_round_trip_and_bad_inputs(ctc_model, corpus, tmp_path, tiny_cfg):
    model, init = ctc_model
    save_snapshot(init, tmp_path / "init.safetensors")
    loaded = load_snapshot(tmp_path / "init.safetensors")
    assert set(loaded) == set(init) and all(torch.equal(loaded[k], init[k]) for k in init)
    dev = corpus / "dev_manifest.json"
    with pytest.raises(ValueError, match="mode 'reinit' needs the step-0 init snapshot"):
        probe(model, dev, ProbeConfig(modes=("reinit",)))
    other = EncDecCTCModelBPE(cfg=tiny_cfg("conformer_gn_tiny", "model.encoder.d_model=48",
                                           "model.encoder.n_layers=3").model)
    with pytest.raises(ValueError, match="init snapshot does not match the model: shape mismatch"):
        probe(model, dev, ProbeConfig(modes=("reinit",)), init=layer_snapshot(other))
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        probe(model, tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="manifest is empty"):
        probe(model, tmp_path / "empty.json")
    with pytest.raises(ValueError, match="draws must be >= 1"):
        ProbeConfig(draws=0)
    with pytest.raises(ValueError, match="unknown unit 'head'; choose one of block, module"):
        ProbeConfig(unit="head")
    with pytest.raises(ValueError, match="unknown probe mode"):
        ProbeConfig(modes=("shuffle",))
    model.encoder = torch.nn.Identity()
    with pytest.raises(ValueError, match="model has no Conformer encoder"):
        probe(model, dev)


@pytest.mark.integration
def test_cli_probe_on_a_nemo_file(ctc_model, corpus, tmp_path, capsys, caplog):
    from nemo_layerfx import cli

    model, init = ctc_model
    model.save_to(str(tmp_path / "m.nemo"))
    save_snapshot(init, tmp_path / "init.safetensors")
    args = ["probe", str(tmp_path / "m.nemo"), "--manifest", str(corpus / "dev_manifest.json"), "--out",
            str(tmp_path / "out")]
    assert cli.main(args + ["--mode", "reinit"]) == 2
    assert "--mode reinit needs --init" in capsys.readouterr().err
    assert cli.main(args + ["--mode", "both", "--init", str(tmp_path / "init.safetensors"), "--draws", "2"]) == 0
    printed = capsys.readouterr().out
    assert "baseline WER" in printed and "layers.2" in printed and "dWER reinit" in printed
    report = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert set(report["delta_wer"]) == {"reinit", "rerand"} and len(report["units"]) == 3
    assert (tmp_path / "out" / "probe.png").stat().st_size > 1000
    assert "If you intend to do" not in caplog.text  # restoring prints no data-config dumps


@pytest.mark.unit
def test_spearman_and_compare_reports(tmp_path, capsys):
    from nemo_layerfx import cli
    from nemo_layerfx.importance import compare_reports, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties share their rank
    units = [f"layers.{i}" for i in range(4)]
    a = {"units": units, "delta_wer": {"rerand": [0.00, 0.01, 0.05, 0.20]}}
    b = {"units": units, "delta_wer": {"rerand": [0.01, 0.00, 0.06, 0.30]}}
    c = {"units": units[:2], "delta_wer": {"rerand": [0.00, 0.40]}}
    result = compare_reports([a, b], top_n=2)
    assert result["pairs"][0]["spearman"] == pytest.approx(0.8) and result["mean_overlap"] == 1.0
    with pytest.raises(ValueError, match="has no 'reinit' results"):
        compare_reports([a, b], mode="reinit")
    for name, r in (("a", a), ("b", b), ("c", c)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    assert cli.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "c.json"),
                     "--top-n", "1", "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "spearman +0.800" in printed and "spearman n/a (different depths" in printed
    assert json.loads((tmp_path / "cmp.json").read_text())["pairs"][1]["same_units"] is False
    # a block report and a module report rate different things: refused, not a made-up overlap
    m = {"units": [f"layers.{i}.{p}" for i in range(2) for p in ("ffn1", "attn")], "delta_wer": {"rerand": [0.1] * 4}}
    with pytest.raises(ValueError, match=r"rate different units: report 0 blocks .*report 1 modules \(layers.0.ffn1"):
        compare_reports([a, m])
    assert cli.main(["compare", str(tmp_path / "a.json")]) == 2
    assert "at least two probe reports" in capsys.readouterr().err


@pytest.mark.unit
def test_paired_bootstrap_interval_matches_a_plain_loop():
    import numpy as np

    from nemo_layerfx.evaluate import resamples
    from nemo_layerfx.importance.stats import delta_interval, draw_spread

    rng = np.random.default_rng(0)
    words = rng.integers(3, 9, size=40)
    base = rng.binomial(words, 0.1)
    variant = np.stack([rng.binomial(words, 0.2), rng.binomial(words, 0.25)])  # two draws
    idx = resamples(40, 500, seed=3)
    lo, hi = delta_interval(base, words, variant, idx, level=0.9)
    deltas = []
    for row in idx:  # the same maths, one resample at a time
        w = sum(int(words[i]) for i in row)
        deltas.append((sum(float(variant[:, i].mean()) for i in row) - sum(int(base[i]) for i in row)) / w)
    assert lo == pytest.approx(float(np.quantile(deltas, 0.05))) and hi == pytest.approx(float(np.quantile(deltas, 0.95)))
    point = (variant.sum(axis=1).mean() - base.sum()) / words.sum()
    assert lo < point < hi and lo > 0  # clearly worse: the interval excludes 0
    per_draw = (variant.sum(axis=1) - base.sum()) / words.sum()
    assert draw_spread(base, words, variant) == pytest.approx(float(np.std(per_draw, ddof=1)))
    same = np.stack([base])  # a reset that changes nothing: [0, 0]
    assert delta_interval(base, words, same, idx) == (0.0, 0.0) and draw_spread(base, words, same) is None


@pytest.mark.integration
def test_interval_labels_on_a_seeded_model(ctc_model, corpus, tmp_path):
    from nemo_layerfx.fd import DropoutPlan
    from nemo_layerfx.importance import plot_report

    model, init = ctc_model
    now = layer_snapshot(model)  # "re-init" to the current values: a reset that changes nothing
    cfg = ProbeConfig(modes=("reinit", "rerand"), draws=2, rule="ci", bootstrap=400, seed=1)
    report = probe(model, corpus / "dev_manifest.json", cfg, init=now)
    assert report.delta_wer["reinit"] == [0.0] * 3 and report.delta_ci["reinit"] == [[0.0, 0.0]] * 3
    assert report.ambient["reinit"] == report.units  # not significantly worse than the baseline: ambient
    for d, (lo, hi), sd in zip(report.delta_wer["rerand"], report.delta_ci["rerand"], report.delta_draw_sd["rerand"]):
        assert lo <= d <= hi and sd is not None and sd >= 0
    assert report.ambient["rerand"] == [u for u, (lo, _) in zip(report.units, report.delta_ci["rerand"]) if lo <= 0]
    again = probe(model, corpus / "dev_manifest.json", cfg, init=now)
    assert again.delta_ci == report.delta_ci  # seeded resamples
    assert "95% CI" in report.table() and "interval reaches 0" in report.table()
    plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    plan = DropoutPlan.targeted(report, n="labels", rate=0.5, mode="reinit")
    assert plan.rates["ffn"] == [0.5, 0.5, 0.5]  # every layer was labelled ambient
    with pytest.raises(ValueError, match="unknown ambient rule 'loose'"):
        ProbeConfig(rule="loose")
