"""Shared fixtures: a tiny real speech corpus (espeak-ng), composed shipped configs, quiet NeMo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def fresh_python(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a new interpreter (for process-wide state: imports, global hooks); its last line of output."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]

# Overrides that shrink any shipped tiny preset to a seconds-long CPU run.
TINY = [
    "model.encoder.d_model=32",
    "model.encoder.n_heads=2",
    "model.encoder.n_layers=2",
    "model.encoder.subsampling_conv_channels=16",
    "model.encoder.conv_norm_type=group_norm4",
    "model.train_ds.batch_size=8",
    "model.validation_ds.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "++trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
    "exp_manager.create_checkpoint_callback=false",
    "layerfx.report_wer=false",
]
TINY_RNNT = ["model.model_defaults.pred_hidden=32", "model.model_defaults.joint_hidden=32"]


def pytest_configure(config):
    from nemo.utils import logging

    logging.setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """48 real utterances of the command grammar from 4 espeak-ng voices, with a BPE tokenizer."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are required (apt-get install -y espeak-ng sox); run scripts/setup.sh")
    from nemo_layerfx.corpus import CorpusConfig, make_corpus

    out = tmp_path_factory.mktemp("corpus")
    make_corpus(CorpusConfig(out=str(out), n=48, speakers=4, seed=1, dev_frac=0.2, test_frac=0.1, vocab_size=32))
    return out


@pytest.fixture
def tiny_cfg(corpus, tmp_path):
    """``tiny_cfg(name, *extra)``: a shipped preset shrunk for tests, pointed at the test corpus."""

    from nemo_layerfx.train import compose_config

    def make(name: str, *extra: str):
        over = TINY + (TINY_RNNT if "transducer" in name or "hybrid" in name else [])
        return compose_config(name, over + [f"corpus_dir={corpus}", f"exp_manager.exp_dir={tmp_path}", *extra])

    return make


_FEATURES: dict = {}


def features(model):
    """Log-mel features of a fixed padded batch (3 utterances of 1, 0.69 and 0.44 s), computed once per preprocessor
    config: NeMo's featurizer can differ in the last bits between calls on CPU (seen up to ~2e-4 after
    normalization), and tests that compare encoders exactly must feed both the same input."""
    import torch

    key = str(model.cfg.preprocessor)
    if key not in _FEATURES:
        g = torch.Generator().manual_seed(0)
        audio, lengths = torch.randn(3, 16000, generator=g), torch.tensor([16000, 11000, 7000])
        model.preprocessor.eval()
        with torch.no_grad():
            _FEATURES[key] = model.preprocessor(input_signal=audio, length=lengths)
    return _FEATURES[key]


def encoded(model):
    """The encoder's (output, lengths) on ``features(model)``, in eval mode without gradients."""
    import torch

    feats, flen = features(model)
    model.eval()
    with torch.no_grad():
        return model.encoder(audio_signal=feats, length=flen)
