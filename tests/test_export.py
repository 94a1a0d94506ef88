"""NeMo's TorchScript export (``model.export("m.ts")``: ``torch.jit.trace`` under ``inference_mode``, then
``freeze``) of our models gives a graph that follows new input shapes.

The trace takes our CPU inference layouts, and a trace records strides and Python-side decisions as constants: a
graph traced on one batch failed or went wrong on another (before: the channels-last front end's patch view failed
at another length; the shifted-score view would have read the wrong scores). Exported once, each model here runs
batches of other sizes, lengths and padding and must match the eager model.
"""

from __future__ import annotations

import pytest
import torch
from test_pruning import gated

from nemo_layerfx.pruning import prune
from nemo_layerfx.train import model_class

# (batch, frames, lengths): another batch size, longer and shorter than the export's own example, and no padding
BATCHES = [(3, 160, (160, 101, 37)), (1, 96, (96,)), (5, 23, (23, 23, 20, 17, 23))]


def _batches():
    g = torch.Generator().manual_seed(0)
    for b, t, lengths in BATCHES:
        yield torch.randn(b, 80, t, generator=g), torch.tensor(lengths)


def _check_export(model, path):
    model.eval()
    model.export(str(path), check_trace=False)
    exported = torch.jit.load(str(path))
    for feats, lengths in _batches():
        with torch.no_grad():
            want = model.decoder(encoder_output=model.encoder(audio_signal=feats, length=lengths)[0])
            got = exported(feats, lengths)
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert got.shape == want.shape
        valid = torch.arange(want.size(1))[None] < ((lengths + 3) // 4)[:, None]  # 4x subsampling
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_torchscript_export_of_the_groupnorm_model_follows_new_shapes(tiny_cfg, tmp_path):
    cfg = tiny_cfg("conformer_gn_tiny")
    torch.manual_seed(0)
    _check_export(model_class(cfg)(cfg=cfg.model), tmp_path / "dense.ts")


@pytest.mark.integration
def test_torchscript_export_of_a_pruned_model_follows_new_shapes(tiny_cfg, tmp_path):
    """Per-head-width attention (values padded to a multiple of 8 in CPU inference), narrowed FFNs and conv."""
    small, _ = prune(gated(tiny_cfg))
    assert len(set(small.encoder.layers[0].self_attn.qk_dims)) > 1  # heads of different widths
    _check_export(small, tmp_path / "pruned.ts")
