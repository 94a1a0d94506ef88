"""NVIDIA-style pretrained Conformers in place: a BatchNorm model trained by NeMo's own script is probed,
factorized and merged, given an inference depth, gated and pruned, with its own normalization kept; identities
where nothing is removed; conv-group gates (which need GroupNorm groups) are refused by name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, encoded

import nemo_layerfx  # noqa: F401
from nemo_layerfx.models import adopt_, clone_model, restore
from nemo_layerfx_cli import main as layerfx

STOCK = ["model.encoder._target_=nemo.collections.asr.modules.ConformerEncoder",
         "model.encoder.conv_norm_type=batch_norm", "model.encoder.n_layers=3"]


@pytest.fixture(scope="module")
def stock_nemo(corpus, tmp_path_factory):
    """A BatchNorm Conformer-CTC trained for one epoch by the body of NeMo's speech_to_text_ctc_bpe.py, as NeMo's
    checkpoint callback saved it."""
    tmp = tmp_path_factory.mktemp("stock")
    over = [o for o in TINY if not o.startswith(("exp_manager.create_checkpoint", "trainer.max_steps"))]
    out = subprocess.run([sys.executable, str(REPO / "tests/scripts/nemo_speech_to_text_ctc_bpe.py"), "--config-path",
                          str(REPO / "conf"), "--config-name", "conformer_gn_tiny", *over, *STOCK,
                          f"corpus_dir={corpus}", f"exp_manager.exp_dir={tmp}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ENCODER ConformerEncoder STEPS 5" in out.stdout  # one epoch of the test corpus
    return max(tmp.rglob("checkpoints/*.nemo"), key=lambda p: p.stat().st_mtime)


def outputs(model):
    return encoded(model)[0]


@pytest.mark.integration
@pytest.mark.slow
def test_a_stock_batchnorm_model_is_adopted_factorized_and_cut_in_place(stock_nemo, corpus, tmp_path, capsys):
    stock = restore(stock_nemo).eval()
    assert type(stock.encoder).__name__ == "ConformerEncoder"
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in stock.encoder.modules())
    reference = outputs(stock)
    # adopting keeps every tensor (strict load) and the BatchNorm; outputs equal up to the CPU inference layouts
    ours = clone_model(stock)
    assert adopt_(ours) and not adopt_(ours)
    assert type(ours.encoder).__name__ == "GroupNormConformerEncoder" and ours.cfg.encoder.conv_norm_type == "batch_norm"
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in ours.encoder.modules())
    assert set(ours.state_dict()) == set(stock.state_dict())
    torch.testing.assert_close(outputs(ours), reference, rtol=0, atol=1e-5)

    # lowrank -> merge: the factorized model is smaller, and merge gives back a dense model with its outputs
    small, merged = tmp_path / "small.nemo", tmp_path / "merged.nemo"
    assert layerfx(["lowrank", str(stock_nemo), str(small), "--att", "0.25", "--ffn", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "own conv norm (batch_norm); every tensor kept" in printed
    low = restore(small).eval()
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in stock.parameters())
    assert low.cfg.encoder.conv_norm_type == "batch_norm"
    assert layerfx(["merge", str(small), str(merged)]) == 0
    torch.testing.assert_close(outputs(restore(merged).eval()), outputs(low), rtol=0, atol=1e-5)
    # a rank that saves nothing is not applied: α = 1 (and 0.5 of the square attention projections) is the identity
    same = tmp_path / "same.nemo"
    assert layerfx(["lowrank", str(stock_nemo), str(same), "--att", "0.5", "--ffn", "1.0"]) == 0
    assert "left dense, a factorization would save nothing: layers.0.self_attn.linear_q (32x32: rank 16" in \
        capsys.readouterr().out
    kept = restore(same).eval()
    assert not any(type(m).__name__ == "LowRankLinear" for m in kept.modules())
    torch.testing.assert_close(outputs(kept), reference, rtol=0, atol=1e-5)

    # set-depth: the full depth is the identity, a shorter one equals the model cut to that many layers
    full, short = tmp_path / "full.nemo", tmp_path / "short.nemo"
    assert layerfx(["set-depth", str(stock_nemo), str(full), "--depth", "3"]) == 0
    torch.testing.assert_close(outputs(restore(full).eval()), reference, rtol=0, atol=1e-5)
    assert layerfx(["set-depth", str(stock_nemo), str(short), "--depth", "2"]) == 0
    cut = restore(short).eval()
    assert cut.cfg.encoder.conv_norm_type == "batch_norm" and cut.encoder.inference_depth == 2
    assert (outputs(cut) - reference).abs().max() > 1e-3  # one layer fewer is another model

    # the probe runs on the stock model as it is
    assert layerfx(["probe", str(stock_nemo), "--manifest", str(corpus / "dev_manifest.json"), "--out",
                    str(tmp_path / "p"), "--bootstrap", "0"]) == 0
    assert "baseline WER" in capsys.readouterr().out

    # gates -> prune with the BatchNorm kept: FFN, query/key and value units (conv groups need a GroupNorm)
    from nemo_layerfx.pruning import add_gates, gates_of, prune

    with pytest.raises(ValueError, match="a BatchNorm or LayerNorm conv norm has no groups to drop"):
        add_gates(stock, {"locations": ["ffn", "conv"], "steps": 10})
    gated = add_gates(stock, {"locations": ["ffn", "qk", "v"], "steps": 10}).eval()
    assert gated.cfg.encoder.conv_norm_type == "batch_norm"
    torch.testing.assert_close(outputs(gated), reference, rtol=0, atol=1e-5)  # gates start open
    same, report = prune(gated)  # nothing closed: the identity, and it says the schedule had not run
    assert report.params_after == sum(p.numel() for p in stock.parameters()) and report.notes
    torch.testing.assert_close(outputs(same), reference, rtol=0, atol=1e-5)
    gated.encoder.adaptive_dropout_schedule.step.fill_(10)  # c(t) = c_inf; close about half of every gate
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in gates_of(gated):
            for g in layer.values():
                g.beta_prime.normal_(0.0, 0.3)
                g.beta_prime[0] = 0.5
    small, report = prune(gated)
    assert report.params_after < report.params_before and small.cfg.encoder.conv_norm_type == "batch_norm"
    assert "conv_channels" not in small.cfg.encoder and isinstance(small.encoder.layers[0].conv.batch_norm,
                                                                   torch.nn.BatchNorm1d)
    torch.testing.assert_close(outputs(small.eval()), outputs(gated), rtol=1e-5, atol=1e-5)  # the prune is exact
    small.save_to(str(tmp_path / "pruned.nemo"))
    torch.testing.assert_close(outputs(restore(tmp_path / "pruned.nemo").eval()), outputs(small), rtol=0, atol=0)

