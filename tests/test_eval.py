"""`layerfx eval` equals NeMo's transcribe() + word_error_rate; what a new user trips over gets one clear line."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import nemo_layerfx  # noqa: F401
from nemo.collections.asr.metrics.wer import word_error_rate
from nemo_layerfx.depth import set_inference_depth
from nemo_layerfx.evaluate import evaluate, read_manifest
from nemo_layerfx.models import restore
from nemo_layerfx.train import model_class
from nemo_layerfx_cli import main as layerfx


@pytest.fixture(scope="module")
def sli_nemo(corpus, tmp_path_factory):
    """A 3-layer CTC model (layers moved away from their init) saved with inference depth 2 (SLI(2))."""
    from nemo_layerfx.train import compose_config
    from conftest import TINY

    tmp = tmp_path_factory.mktemp("eval")
    cfg = compose_config("conformer_gn_tiny", TINY + ["model.encoder.n_layers=3", f"corpus_dir={corpus}",
                                                      f"exp_manager.exp_dir={tmp}"])
    torch.manual_seed(0)
    model = model_class(cfg)(cfg=cfg.model).eval()
    with torch.no_grad():
        for p in model.encoder.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_to(str(tmp / "full.nemo"))
    set_inference_depth(model, 2).save_to(str(tmp / "sli2.nemo"))
    return tmp / "sli2.nemo"


@pytest.mark.integration
def test_eval_equals_transcribe_and_word_error_rate(sli_nemo, corpus, capsys):
    manifest = corpus / "test_manifest.json"
    model = restore(sli_nemo).eval()
    rows = read_manifest(manifest)
    hyps = [h.text if hasattr(h, "text") else h
            for h in model.transcribe([r["audio_filepath"] for r in rows], batch_size=4, verbose=False)]
    expected = word_error_rate(hypotheses=hyps, references=[r["text"] for r in rows])
    assert layerfx(["eval", str(sli_nemo), "--manifest", str(manifest), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["wer"] == pytest.approx(expected, abs=1e-12)
    assert got["depth"] == 2 and got["n_layers"] == 3 and got["utterances"] == len(rows)
    assert got["parameters"] == sum(p.numel() for p in model.parameters())
    assert got["words"] == sum(len(r["text"].split()) for r in rows) and got["rtf"] > 0
    lo, hi = got["wer_ci"]
    assert lo <= got["wer"] <= hi
    assert layerfx(["eval", str(sli_nemo), "--manifest", str(manifest), "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"WER {expected:.4f} on {len(rows)} utterances" in printed and "2 of 3 layers (inference depth)" in printed
    # the interval: a percentile bootstrap of the corpus WER over utterances, seeded
    report = evaluate(model, manifest, bootstrap=200, seed=1)
    assert report.wer_ci == evaluate(model, manifest, bootstrap=200, seed=1).wer_ci
    assert report.wer_ci != evaluate(model, manifest, bootstrap=200, seed=2).wer_ci or lo == hi


@pytest.mark.integration
def test_sweep_of_a_set_depth_model_runs_its_depth_unless_asked(sli_nemo, corpus, tmp_path, capsys):
    manifest = corpus / "dev_manifest.json"
    assert layerfx(["depth-sweep", str(sli_nemo), "--manifest", str(manifest), "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "the model runs 2 of its 3 layers (inference depth 2); depths 1..2 swept" in printed
    sweep = json.loads((tmp_path / "a" / "depth_sweep.json").read_text())
    assert sweep["depths"] == [1, 2]
    assert sweep["wer"][-1] == pytest.approx(evaluate(restore(sli_nemo), manifest, bootstrap=0).wer, abs=1e-12)
    assert layerfx(["depth-sweep", str(sli_nemo), "--manifest", str(manifest), "--out", str(tmp_path / "b"),
                    "--all-layers"]) == 0
    assert "dWER vs 2" in capsys.readouterr().out  # changes are against the depth the model runs
    every = json.loads((tmp_path / "b" / "depth_sweep.json").read_text())
    assert every["depths"] == [1, 2, 3] and every["loss"][:2] == pytest.approx(sweep["loss"], rel=1e-6)
    full = restore(sli_nemo.parent / "full.nemo")
    assert every["loss"][2] != pytest.approx(every["loss"][1], rel=1e-3)  # the depths differ: the check can fail
    assert every["wer"][2] == pytest.approx(evaluate(full, manifest, bootstrap=0).wer, abs=1e-12)
    # a second sweep into the same folder is refused by name (the first is kept), unless --force
    before = (tmp_path / "a" / "depth_sweep.json").read_text()
    assert layerfx(["depth-sweep", str(sli_nemo), "--manifest", str(manifest), "--out", str(tmp_path / "a")]) == 2
    assert "already holds depth_sweep.json" in capsys.readouterr().err
    assert (tmp_path / "a" / "depth_sweep.json").read_text() == before
    assert layerfx(["depth-sweep", str(sli_nemo), "--manifest", str(manifest), "--out", str(tmp_path / "a"),
                    "--force"]) == 0


@pytest.mark.integration
def test_inputs_only_the_files_can_rule_out_are_refused_before_the_model_loads(sli_nemo, corpus, tmp_path, capsys):
    # a manifest line whose audio is missing: the line and how relative paths resolve, before any model work
    manifest = tmp_path / "dev.json"
    rows = [json.loads(line) for line in (corpus / "dev_manifest.json").read_text().splitlines()]
    for r in rows:
        r["audio_filepath"] = str(corpus / r["audio_filepath"])
    rows[1]["audio_filepath"] = "wav/missing.wav"  # relative: resolved against tmp_path, where it is not
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    garbage = tmp_path / "garbage.nemo"  # never read: the manifest is checked first
    garbage.write_bytes(b"not a model")
    for argv in (["probe", str(garbage), "--manifest", str(manifest), "--out", str(tmp_path / "p")],
                 ["depth-sweep", str(garbage), "--manifest", str(manifest), "--out", str(tmp_path / "d")],
                 ["eval", str(garbage), "--manifest", str(manifest)]):
        assert layerfx(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{manifest} line 2: no such audio file {tmp_path / 'wav' / 'missing.wav'}" in err
        assert "resolved against the manifest's folder" in err
    # set-depth beyond the layers the config declares
    assert layerfx(["set-depth", str(sli_nemo), str(tmp_path / "x.nemo"), "--depth", "7"]) == 2
    assert "inference depth 7 is not one of the model's 3 layers (1..3; 0: all layers)" in capsys.readouterr().err
    assert not (tmp_path / "x.nemo").exists()
    # convert-norm of a model that already has our GroupNorm encoder
    assert layerfx(["convert-norm", str(sli_nemo), str(tmp_path / "y.nemo"), "--groups", "4"]) == 2
    assert "already has the padding-exact GroupNorm encoder (group_norm4); nothing to convert" in \
        capsys.readouterr().err
    # compare of a file that is not a probe report names the file and the problem
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "text.json").write_text("not json")
    for bad, why in (("notes.json", "it has no 'units' and 'delta_wer'"), ("text.json", "not JSON")):
        assert layerfx(["compare", str(tmp_path / bad), str(tmp_path / bad)]) == 2
        assert f"{tmp_path / bad} is not a probe report: {why}" in capsys.readouterr().err


@pytest.mark.integration
def test_written_nemo_files_follow_the_umask(sli_nemo, tmp_path):
    old = os.umask(0o022)
    try:
        assert layerfx(["set-depth", str(sli_nemo), str(tmp_path / "m.nemo"), "--depth", "1"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.nemo").stat().st_mode) == 0o644  # mkstemp's 0600 before the fix
