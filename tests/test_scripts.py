"""Command-line paths as users run them: our entry point, and NeMo's unmodified example scripts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, TINY, TINY_RNNT


def run(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.integration
@pytest.mark.slow
def test_examples_speech_to_text_entry_point(corpus, tmp_path):
    out = run([str(REPO / "examples/asr/speech_to_text.py"), "--config-name", "conformer_gn_tiny", *TINY,
               f"corpus_dir={corpus}", f"exp_manager.exp_dir={tmp_path}", "layerfx.report_wer=true",
               f"layerfx.save_to={tmp_path}/m.nemo"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "[layerfx] dev WER at start:" in out.stdout and "dev WER at end:" in out.stdout
    assert f"[layerfx] trained model: {(tmp_path / 'm.nemo').resolve()}" in out.stdout
    assert "manifest_filepath` was None" not in out.stdout + out.stderr  # no test set is not worth a warning
    # NeMo's info logs go to the experiment's log file, not the console
    assert "[NeMo I" not in out.stdout + out.stderr
    logs = list(tmp_path.glob("*/*/nemo_log_globalrank-0.txt"))
    assert len(logs) == 1 and "[NeMo I" in logs[0].read_text() and "Experiments will be logged at" in logs[0].read_text()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("script, config", [
    ("nemo_speech_to_text_ctc_bpe.py", "conformer_gn_tiny"),
    ("nemo_speech_to_text_rnnt_bpe.py", "conformer_gn_transducer_tiny"),
    ("nemo_speech_to_text_ctc_bpe.py", "conformer_gn_lowrank_tiny"),
    ("nemo_speech_to_text_ctc_bpe.py", "conformer_gn_shared_tiny"),
    ("nemo_speech_to_text_ctc_bpe.py", "conformer_gn_adaptive_dropout_tiny"),
])
def test_stock_nemo_script_with_our_config(corpus, tmp_path, script, config):
    over = TINY + (TINY_RNNT if "transducer" in config else [])
    if "shared" in config:  # 2 layers after TINY: sample N in {1, 2}
        over += ["model.encoder.depth_sampling.low=1", "model.encoder.depth_sampling.high=2"]
    args = [str(REPO / "tests/scripts" / script), "--config-path", str(REPO / "conf"), "--config-name", config,
            *over, f"corpus_dir={corpus}", f"exp_manager.exp_dir={tmp_path}"]
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "ENCODER GroupNormConformerEncoder STEPS 2" in out.stdout
    if "lowrank" in config:  # 2 layers x (5 attention + 4 FFN linears) built factorized from the shipped config
        assert "LOWRANK 18" in out.stdout
    if "adaptive" in config:  # 2 layers x 5 gates (ffn1, ffn2, qk, v, conv), trained with the config's callback
        assert "GATES 10" in out.stdout
    if "shared" in config:  # one parameter set; the config's DepthSampling callback drew a depth per step
        from nemo_layerfx.depth import DepthSampler

        assert f"SHARED 1 DEPTHS {[DepthSampler(1, 2, 0).draw(s) for s in (0, 1)]}" in out.stdout, out.stdout[-2000:]
    if config == "conformer_gn_tiny":  # without the hydra.callbacks hook NeMo's allow-list refuses our encoder
        out = run(args + ["~hydra.callbacks.layerfx"], tmp_path)
        assert out.returncode != 0 and "UnsafeTargetError" in out.stdout + out.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_missing_manifest_is_a_clear_error(corpus, tmp_path):
    out = run([str(REPO / "examples/asr/speech_to_text.py"), "--config-name", "conformer_gn_tiny", *TINY,
               f"corpus_dir={corpus}", f"model.train_ds.manifest_filepath={tmp_path}/nope.json"], tmp_path)
    assert out.returncode == 2
    printed = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert printed == [f"[layerfx] error: model.train_ds.manifest_filepath: no such manifest: {tmp_path}/nope.json "
                       f"(point it at a NeMo manifest, or set corpus_dir= to a folder made by layerfx make-corpus)"]
    # a config name that is not shipped: one line listing those that are, not Hydra's 50-line traceback
    out = run([str(REPO / "examples/asr/speech_to_text.py"), "--config-name", "nope"], tmp_path)
    printed = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and len(printed) == 1, printed
    assert printed[0].startswith("[layerfx] error: no config named 'nope' in ") and "conformer_gn_tiny," in printed[0]


@pytest.mark.unit
def test_config_name_check_reads_every_hydra_spelling():
    from nemo_layerfx.train import check_config_name

    assert check_config_name(["--config-name", "conformer_gn_tiny", "trainer.max_steps=2"]) is None
    assert check_config_name(["--config-name=conformer_gn_tiny.yaml"]) is None
    assert check_config_name([]) is None  # the default, conformer_gn
    assert "no config named 'nope'" in check_config_name(["-cn", "nope"])
    assert "no config named 'nope'" in check_config_name(["--config-name=nope"])
    assert check_config_name(["--config-path", "/elsewhere", "--config-name", "mine"]) is None  # the user's folder
