"""LayerImportanceCallback: from config, snapshot at fit start, probe points, and training left unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_layerfx.callbacks import LayerImportanceCallback
from nemo_layerfx.importance import load_snapshot
from nemo_layerfx.train import train


def callback_entry(out_dir, **kw) -> str:
    extra = "".join(f", {k}: {v}" for k, v in kw.items())
    return (f"+trainer.callbacks=[{{_target_: nemo_layerfx.callbacks.LayerImportanceCallback, "
            f"out_dir: '{out_dir}', max_utterances: 8{extra}}}]")


@pytest.mark.integration
def test_probing_leaves_training_exactly_as_it_was(tiny_cfg, tmp_path):
    common = ["layerfx.seed=3", "trainer.max_steps=4", "trainer.max_epochs=10"]
    plain = train(tiny_cfg("conformer_gn_tiny", *common)).state_dict()
    out = tmp_path / "imp"
    model = train(tiny_cfg("conformer_gn_tiny", *common, callback_entry(out, at_steps="[2]", batch_variants=3),
                           "exp_manager.create_tensorboard_logger=true"))
    probed = model.state_dict()
    assert all(torch.equal(plain[k], probed[k]) for k in plain), "probing changed the training run"
    cb = next(c for c in model.trainer.callbacks if isinstance(c, LayerImportanceCallback))
    assert [h["step"] for h in cb.history] == [2, 4]  # at step 2 and at fit end
    assert (out / "probe_step2.json").is_file() and (out / "probe_step4.json").is_file()
    report = json.loads((out / "probe_step4.json").read_text())
    assert set(report["delta_wer"]) == {"reinit", "rerand"} and report["churn"]["block"]
    assert (out / "importance.png").stat().st_size > 1000
    # TensorBoard got the per-unit scalars and the heatmap image at both probe points
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(model.trainer.log_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Images("importance/heatmap")] == [2, 4]
    assert events.Images("importance/heatmap")[-1].width > 100
    assert len(events.Scalars("importance/rerand/dwer/layers.1")) == 2
    assert "importance/churn/block/layers.0" in events.Tags()["scalars"]
    snap = load_snapshot(out / "init_layers.safetensors")
    assert not torch.equal(snap["layers.0.feed_forward1.linear1.weight"],
                           probed["encoder.layers.0.feed_forward1.linear1.weight"])


@pytest.mark.integration
def test_resumed_run_reuses_the_step0_snapshot(tiny_cfg, tmp_path):
    out = tmp_path / "imp"
    train(tiny_cfg("conformer_gn_tiny", "trainer.max_steps=2", callback_entry(out, at_fit_end="false")))
    first = load_snapshot(out / "init_layers.safetensors")
    model = train(tiny_cfg("conformer_gn_tiny", "trainer.max_steps=2", callback_entry(out, at_fit_end="false")))
    cb = next(c for c in model.trainer.callbacks if isinstance(c, LayerImportanceCallback))
    assert all(torch.equal(first[k], cb.snapshot[k]) for k in first)
    assert cb.history == []


@pytest.mark.unit
def test_callback_argument_errors():
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        LayerImportanceCallback(every_n_epochs=0)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        LayerImportanceCallback(draws=0)
    with pytest.raises(ValueError, match="unknown unit"):
        LayerImportanceCallback(unit="neuron")
