"""The shipped configs train real NeMo CTC / RNNT / hybrid models through the entry point; .nemo round trips."""

from __future__ import annotations

import json

import pytest
import torch

import nemo_layerfx  # noqa: F401
from nemo_layerfx.encoder import GroupNormConformerEncoder
from nemo_layerfx.train import model_class_name, train


@pytest.mark.integration
@pytest.mark.parametrize("config, cls_name", [
    ("conformer_gn_tiny", "EncDecCTCModelBPE"),
    ("conformer_gn_transducer_tiny", "EncDecRNNTBPEModel"),
    ("conformer_gn_hybrid_tiny", "EncDecHybridRNNTCTCBPEModel"),
])
def test_shipped_config_trains_through_entry_point(tiny_cfg, config, cls_name, tmp_path):
    cfg = tiny_cfg(config, "layerfx.report_wer=true", f"layerfx.report_path={tmp_path}/report.json",
                   f"layerfx.save_to={tmp_path}/model.nemo")
    torch.manual_seed(0)
    model = train(cfg)
    assert type(model).__name__ == cls_name
    assert isinstance(model.encoder, GroupNormConformerEncoder)
    assert model.trainer.global_step == 2
    (optimizer,) = model.trainer.optimizers  # the configs' optim.fused reaches torch's AdamW (one kernel per step)
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["fused"] is True
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0.0 <= report["start"]["val_wer"] and 0.0 <= report["end"]["val_wer"]
    assert (tmp_path / "model.nemo").is_file()
    assert report["nemo"] == str((tmp_path / "model.nemo").resolve())  # the next commands need its path


@pytest.mark.integration
def test_loss_falls_and_config_callbacks_run(tiny_cfg, tmp_path):
    """40 steps on one real batch must cut the CTC loss by over 30% (127 -> 74 measured); the loss is
    recorded by a plugin callback listed under trainer.callbacks, as a user would list it."""
    hist = tmp_path / "loss.json"
    cfg = tiny_cfg("conformer_gn_tiny", "trainer.max_steps=40", "trainer.max_epochs=100",
                   "++trainer.limit_val_batches=0", "model.spec_augment.time_masks=0", "model.spec_augment.freq_masks=0",
                   "model.encoder.dropout=0.0", "model.optim.sched.warmup_steps=10", "model.optim.lr=0.08", "model.encoder.d_model=64", "model.encoder.n_heads=4",
                   "model.train_ds.shuffle=false", "model.train_ds.use_semi_sorted_batching=false",
                   "model.train_ds.batch_size=16", "++trainer.limit_train_batches=1",
                   f"+trainer.callbacks=[{{_target_: nemo_layerfx.callbacks.LossHistory, path: '{hist}'}}]")
    torch.manual_seed(0)
    model = train(cfg)
    assert any(type(cb).__name__ == "LossHistory" for cb in model.trainer.callbacks)
    losses = json.loads(hist.read_text())["loss"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"CTC loss did not fall: {first:.1f} -> {last:.1f}"


@pytest.mark.unit
def test_model_class_is_picked_from_config(tiny_cfg):
    assert model_class_name(tiny_cfg("conformer_gn_tiny")) == "ctc_bpe"
    assert model_class_name(tiny_cfg("conformer_gn_transducer_tiny")) == "rnnt_bpe"
    assert model_class_name(tiny_cfg("conformer_gn_hybrid_tiny")) == "hybrid_bpe"
    assert model_class_name(tiny_cfg("conformer_gn_tiny", "layerfx.model_class=ctc")) == "ctc"
    with pytest.raises(ValueError, match="unknown layerfx.model_class 'seq2seq'; choose one of ctc_bpe, ctc"):
        model_class_name(tiny_cfg("conformer_gn_tiny", "layerfx.model_class=seq2seq"))


@pytest.mark.integration
def test_layerfx_seed_makes_training_reproducible(tiny_cfg):
    runs = [train(tiny_cfg("conformer_gn_tiny", "layerfx.seed=3")).state_dict() for _ in range(2)]
    other = train(tiny_cfg("conformer_gn_tiny", "layerfx.seed=4")).state_dict()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], other[k]) for k in runs[0])


@pytest.mark.integration
@pytest.mark.parametrize("name", ["conformer_gn_tiny", "conformer_gn_hybrid_tiny"])
def test_training_memory_counts_weights_state_and_saved_tensors(tiny_cfg, corpus, name):
    from nemo_layerfx import training_memory
    from nemo_layerfx.evaluate import audio_batches, read_manifest
    from nemo_layerfx.train import model_class

    cfg = tiny_cfg(name)
    model = model_class(cfg)(cfg=cfg.model).eval()
    rows = read_manifest(corpus / "train_manifest.json", 4)
    one, two = (next(audio_batches(rows[:n], n, 16000, "cpu")) for n in (2, 4))
    small, big = training_memory(model, *one), training_memory(model, *two, moments=2)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert small["parameters"] == small["gradients"] == weights and small["optimizer_state"] == 0
    assert big["optimizer_state"] == 2 * weights
    assert 1.5 < big["saved_activations"] / small["saved_activations"] < 3  # about twice the utterances' frames
    assert small["total"] == weights * 2 + small["saved_activations"]
    assert not model.training and all(p.grad is None for p in model.parameters())  # nothing left behind
