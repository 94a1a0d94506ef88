""".nemo save/restore: round trips, both directions with NeMo's own group_norm, convert-norm, corrupt files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf, open_dict

import nemo_layerfx  # noqa: F401  (registers the plugin)
from nemo.collections.asr.models import ASRModel, EncDecCTCModelBPE, EncDecRNNTBPEModel
from nemo_layerfx import cli
from nemo_layerfx.models import restore
from nemo_layerfx.encoder import GroupNormConformerEncoder, stock_encoder_config


def dev_batch(corpus, n=3):
    """Real dev utterances of different lengths as one zero-padded batch."""
    rows = [json.loads(line) for line in open(corpus / "dev_manifest.json")][:n]
    waves = [torch.tensor(sf.read(str(corpus / r["audio_filepath"]), dtype="float32")[0]) for r in rows]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    return batch, lengths, [str(corpus / r["audio_filepath"]) for r in rows]


def encode(model, audio, lengths):
    model.eval()
    with torch.no_grad():
        out = model.forward(input_signal=audio, input_signal_length=lengths)
    return out[0]


def stock_model(cfg, norm="group_norm4", cls=EncDecCTCModelBPE):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    with open_dict(cfg):
        cfg.encoder = stock_encoder_config(cfg.encoder)
        cfg.encoder.conv_norm_type = norm
    torch.manual_seed(0)
    return cls(cfg=cfg)


@pytest.mark.integration
@pytest.mark.parametrize("config, cls", [("conformer_gn_tiny", EncDecCTCModelBPE),
                                         ("conformer_gn_transducer_tiny", EncDecRNNTBPEModel)])
def test_save_restore_round_trip_and_transcribe(tiny_cfg, corpus, tmp_path, config, cls):
    torch.manual_seed(0)
    model = cls(cfg=tiny_cfg(config).model)
    audio, lengths, files = dev_batch(corpus)
    before = encode(model, audio, lengths)
    path = tmp_path / "m.nemo"
    model.save_to(str(path))
    restored = ASRModel.restore_from(str(path), map_location="cpu")
    assert isinstance(restored.encoder, GroupNormConformerEncoder)
    assert torch.equal(encode(restored, audio, lengths), before)
    hyps_a = [h.text if hasattr(h, "text") else h for h in model.transcribe(files, batch_size=2, verbose=False)]
    hyps_b = [h.text if hasattr(h, "text") else h for h in restored.transcribe(files, batch_size=3, verbose=False)]
    assert len(hyps_a) == 3 and hyps_a == hyps_b  # batch composition does not change the transcripts


@pytest.mark.integration
def test_nemo_group_norm_checkpoint_loads_into_ours_strict(tiny_cfg, corpus, tmp_path):
    stock = stock_model(tiny_cfg("conformer_gn_tiny"))
    path = tmp_path / "stock.nemo"
    stock.save_to(str(path))
    cfg = ASRModel.restore_from(str(path), return_config=True)
    assert cfg.encoder._target_ == "nemo.collections.asr.modules.ConformerEncoder"
    with open_dict(cfg):
        cfg.encoder._target_ = "nemo_layerfx.encoder.GroupNormConformerEncoder"
    ours = ASRModel.restore_from(str(path), override_config_path=cfg, map_location="cpu", strict=True)
    assert isinstance(ours.encoder, GroupNormConformerEncoder)
    audio, lengths, _ = dev_batch(corpus)
    one = slice(0, 1)
    n = int(lengths[0])
    # no padding: the two norms agree exactly; with padding only ours keeps the utterance's own encoding
    torch.testing.assert_close(encode(ours, audio[one, :n], lengths[one]), encode(stock, audio[one, :n], lengths[one]))
    alone = encode(ours, audio[one, :n], lengths[one])
    in_batch = encode(ours, audio, lengths)[one, : alone.shape[1]]
    assert (alone - in_batch).abs().max() < 1e-4 * alone.abs().max().clamp_min(1)


@pytest.mark.integration
def test_ours_restores_into_stock_nemo_by_swapping_target(tiny_cfg, corpus, tmp_path):
    torch.manual_seed(0)
    ours = EncDecCTCModelBPE(cfg=tiny_cfg("conformer_gn_tiny").model)
    path = tmp_path / "ours.nemo"
    ours.save_to(str(path))
    cfg = ASRModel.restore_from(str(path), return_config=True)
    with open_dict(cfg):
        cfg.encoder = stock_encoder_config(cfg.encoder)
    stock = ASRModel.restore_from(str(path), override_config_path=cfg, map_location="cpu", strict=True)
    assert type(stock.encoder).__name__ == "ConformerEncoder"
    audio, lengths, _ = dev_batch(corpus, n=1)
    torch.testing.assert_close(encode(stock, audio, lengths), encode(ours, audio, lengths))


@pytest.mark.integration
@pytest.mark.slow  # a fresh Python process imports NeMo twice
def test_restore_needs_the_plugin_and_works_once_imported(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ours.nemo"
    EncDecCTCModelBPE(cfg=tiny_cfg("conformer_gn_tiny").model).save_to(str(path))
    script = f"""
from nemo.collections.asr.models import ASRModel
try:
    ASRModel.restore_from({str(path)!r}, map_location="cpu")
    print("RESTORED-WITHOUT-PLUGIN")
except Exception as e:
    print("REFUSED", type(e).__name__)
import nemo_layerfx  # noqa: F401  (registers the plugin)
m = ASRModel.restore_from({str(path)!r}, map_location="cpu")
print("RESTORED", type(m.encoder).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "REFUSED UnsafeTargetError" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "RESTORED GroupNormConformerEncoder" in out.stdout, out.stdout + out.stderr[-3000:]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_convert_norm_batchnorm_model(tiny_cfg, corpus, tmp_path, capsys):
    bn = stock_model(tiny_cfg("conformer_gn_tiny"), norm="batch_norm")
    with torch.no_grad():  # give the BN affine and running stats non-default values
        for layer in bn.encoder.layers:
            layer.conv.batch_norm.weight.uniform_(0.5, 1.5)
            layer.conv.batch_norm.bias.uniform_(-0.2, 0.2)
            layer.conv.batch_norm.running_mean.uniform_(-1, 1)
    src, dst = tmp_path / "bn.nemo", tmp_path / "out" / "gn.nemo"
    bn.save_to(str(src))
    digest = _sha(src)
    assert cli.main(["convert-norm", str(src), str(dst), "--groups", "4"]) == 0
    printed = capsys.readouterr().out
    assert "batch_norm -> group_norm4" in printed and "dropped" in printed
    assert _sha(src) == digest  # input untouched
    gn = ASRModel.restore_from(str(dst), map_location="cpu")
    assert isinstance(gn.encoder, GroupNormConformerEncoder) and gn.encoder.num_groups == 4
    bn_sd, gn_sd = bn.state_dict(), gn.state_dict()
    for key, value in gn_sd.items():
        assert torch.equal(value, bn_sd[key]), key  # every tensor copied, GN affine == BN affine
    assert not any("running_mean" in k for k in gn_sd)
    audio, lengths, _ = dev_batch(corpus)
    assert torch.isfinite(encode(gn, audio, lengths)).all()


@pytest.mark.integration
def test_convert_norm_refusals(tiny_cfg, tmp_path, capsys):
    bn = stock_model(tiny_cfg("conformer_gn_tiny"), norm="batch_norm")
    src = tmp_path / "bn.nemo"
    bn.save_to(str(src))
    assert cli.main(["convert-norm", str(src), str(src)]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert cli.main(["convert-norm", str(src), str(tmp_path / "x.nemo"), "--groups", "5"]) == 2
    assert "--groups 5 must divide d_model=32" in capsys.readouterr().err
    # a model whose encoder is not a Conformer
    cfg = OmegaConf.create(OmegaConf.to_container(tiny_cfg("conformer_gn_tiny").model, resolve=True))
    with open_dict(cfg):
        cfg.encoder = {"_target_": "nemo.collections.asr.modules.ConvASREncoder", "feat_in": 80,
                       "activation": "relu", "conv_mask": True,
                       "jasper": [{"filters": 32, "repeat": 1, "kernel": [11], "stride": [2], "dilation": [1],
                                   "dropout": 0.0, "residual": False, "separable": True}]}
    conv = tmp_path / "conv.nemo"
    EncDecCTCModelBPE(cfg=cfg).save_to(str(conv))
    assert cli.main(["convert-norm", str(conv), str(tmp_path / "y.nemo")]) == 2
    assert "is not a Conformer model: its encoder is 'nemo.collections.asr.modules.ConvASREncoder'" in \
        capsys.readouterr().err
    assert not (tmp_path / "y.nemo").exists()


@pytest.mark.integration
def test_corrupt_or_missing_nemo_is_a_clear_error(tiny_cfg, tmp_path, capsys):
    garbage = tmp_path / "garbage.nemo"
    garbage.write_bytes(b"this is not a tar archive" * 10)
    with pytest.raises(ValueError, match="garbage.nemo is not a .nemo file \\(a .nemo is a tar archive"):
        restore(garbage)
    torch.manual_seed(0)
    good = tmp_path / "good.nemo"
    EncDecCTCModelBPE(cfg=tiny_cfg("conformer_gn_tiny").model).save_to(str(good))
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.nemo"):
        restore(truncated)
    assert cli.main(["convert-norm", str(garbage), str(tmp_path / "z.nemo")]) == 2
    assert "garbage.nemo is not a .nemo file" in capsys.readouterr().err
    assert cli.main(["convert-norm", str(tmp_path / "missing.nemo"), str(tmp_path / "z.nemo")]) == 2
    assert "missing.nemo: no such file" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such .nemo file"):
        restore(tmp_path / "missing.nemo")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["gated", "shared_lowrank"])
def test_a_nemo_saved_by_an_earlier_release_restores_and_computes_the_same(name):
    """``.nemo`` files written by nemo_layerfx 0.2.0 before its aliases were dropped
    (tests/fixtures/make_legacy_nemo.py): their ``_target_`` paths and encoder options still build the model, and it encodes exactly as it did."""
    from pathlib import Path

    data = Path(__file__).resolve().parent / "fixtures"
    model = restore(data / f"legacy_{name}.nemo").eval()
    assert model.cfg.encoder._target_ == "nemo_layerfx.encoder.GroupNormConformerEncoder"
    saved = torch.load(data / f"legacy_{name}.pt")
    with torch.no_grad():
        out, _ = model.encoder(audio_signal=saved["input"], length=torch.tensor([saved["input"].shape[-1]]))
    torch.testing.assert_close(out, saved["encoded"], rtol=1e-5, atol=1e-5)
    if name == "gated":
        assert "adaptive_dropout" in model.cfg.encoder and model.encoder.extension("adaptive_dropout") is not None
    else:
        assert model.encoder.share_layers == 1 and model.encoder.extension("depth_sampling") is not None
        assert any(type(m).__name__ == "LowRankLinear" for m in model.encoder.modules())
