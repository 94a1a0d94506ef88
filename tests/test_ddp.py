"""Several processes (DDP over gloo on CPU): every shipped training config, exactness against one process (our
GroupNorm encoder passes, NeMo's BatchNorm encoder does not), and the importance probe sharded over ranks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, TINY_RNNT

pytestmark = pytest.mark.slow  # each test starts two processes that import NeMo

DDP = ["trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp"]


def run(args: list[str], cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def two_ranks(corpus, tmp_path_factory):
    """tests/scripts/ddp_exactness.py under torchrun with 2 processes: its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    done = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "tests/scripts/ddp_exactness.py"),
                "--corpus", str(corpus), "--out", str(out)], out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.integration
def test_two_ranks_take_the_same_steps_as_one_process_with_groupnorm_not_batchnorm(two_ranks, corpus):
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    import ddp_exactness as dx

    for norm in dx.NORMS:
        single = dx.train(dx.build(str(corpus), norm), str(corpus), rank=0, world=1).state_dict()
        start = dx.build(str(corpus), norm).state_dict()
        ranks = torch.load(two_ranks / f"{norm}.pt", weights_only=True)
        floats = [k for k in single if single[k].is_floating_point()]
        diff = max(float((single[k] - ranks[k]).abs().max()) for k in floats)
        moved = max(float((single[k] - start[k]).abs().max()) for k in floats)
        assert moved > 0.5  # three SGD steps moved the weights a long way: a difference would show
        if norm == "group":
            # the same up to float rounding: the all-reduce sums the gradient in another order and each rank's
            # batch is padded to its own longest utterance (the encoder ignores padding); measured 1.2e-5
            assert diff < 1e-4, f"GroupNorm: 2 ranks x {dx.BATCH} differ from 1 x {2 * dx.BATCH} by {diff}"
        else:
            # BatchNorm normalizes each rank's half-batch with its own statistics: another step (measured 0.70)
            assert diff > 1e-2, f"BatchNorm: 2 ranks matched one process ({diff}); the test cannot tell them apart"


@pytest.mark.integration
def test_probe_sharded_over_ranks_reports_what_one_process_does(two_ranks, corpus):
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    import ddp_exactness as dx
    from nemo_layerfx.importance import ProbeConfig, probe

    model = dx.build(str(corpus), "group")
    model.load_state_dict(torch.load(two_ranks / "group.pt", weights_only=True))  # the weights the ranks probed
    one = probe(model.eval(), corpus / "dev_manifest.json", ProbeConfig(bootstrap=200))
    ranks = json.loads((two_ranks / "probe.json").read_text())
    assert one.utterances == ranks["utterances"] == 9  # 5 + 4: unequal shards, no hang
    for key in ("units", "baseline_wer", "wer", "delta_wer", "delta_ci", "ambient"):
        assert ranks[key] == json.loads(json.dumps(getattr(one, key))), key  # the same transcripts, same order
    assert ranks["baseline_loss"] == pytest.approx(one.baseline_loss, rel=1e-5)  # summed per shard: rounding
    assert ranks["loss"]["rerand"] == pytest.approx(one.loss["rerand"], rel=1e-5)


CONFIGS = [  # (script, config, extra overrides): every shipped training config, each through one of the two paths
    ("ours", "conformer_gn_tiny", ["+trainer.callbacks=[{_target_: nemo_layerfx.callbacks.LayerImportanceCallback, "
                                   "modes: [rerand], bootstrap: 0}]"]),
    ("nemo_speech_to_text_rnnt_bpe.py", "conformer_gn_transducer_tiny", TINY_RNNT),
    ("ours", "conformer_gn_hybrid_tiny", TINY_RNNT),
    ("nemo_speech_to_text_ctc_bpe.py", "conformer_gn_shared_tiny",
     ["model.encoder.depth_sampling.low=1", "model.encoder.depth_sampling.high=2"]),
    ("ours", "conformer_gn_shared_tiny",  # unshared layers: the layers above the sampled depth get no gradient
     ["~model.encoder.share_layers", "model.encoder.depth_sampling.low=1", "model.encoder.depth_sampling.high=2"]),
    ("nemo_speech_to_text_ctc_bpe.py", "conformer_gn_adaptive_dropout_tiny",  # settled gates get no gradient
     ["model.encoder.adaptive_dropout.steps=1", "+model.encoder.adaptive_dropout.settle_after_k=true"]),
    ("ours", "conformer_gn_lowrank_tiny", []),
]


@pytest.mark.integration
@pytest.mark.parametrize("script, config, extra", CONFIGS, ids=[f"{c}-{s.split('_')[-2] if s != 'ours' else s}"
                                                                   + ("-unshared" if "~model.encoder.share_layers" in e
                                                                      else "") for s, c, e in CONFIGS])
def test_shipped_config_trains_on_two_processes(corpus, tmp_path, script, config, extra):
    over = TINY + ["trainer.max_steps=3"] + DDP + [f"corpus_dir={corpus}", f"exp_manager.exp_dir={tmp_path}"] + extra
    if script == "ours":
        args = [str(REPO / "examples/asr/speech_to_text.py"), "--config-name", config, *over,
                f"layerfx.save_to={tmp_path}/model.nemo"]
    else:
        args = [str(REPO / "tests/scripts" / script), "--config-path", str(REPO / "conf"), "--config-name", config,
                *over]
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    if script == "ours":  # one summary line, from rank 0
        assert text.count("[layerfx] trained model:") == 1, text[-3000:]
    else:
        assert "ENCODER GroupNormConformerEncoder STEPS 3" in out.stdout, out.stdout[-2000:]
    if "shared" in config and script != "ours":  # every rank drew the same depth at every step (gathered)
        line = next(line for line in out.stdout.splitlines() if line.startswith("RANK_DEPTHS "))
        ranks = json.loads(line.split(" ", 1)[1])
        assert len(ranks) == 2 and ranks[0] == ranks[1] and len(ranks[0]) == 3, line
    if "adaptive" in config:
        assert len(list(tmp_path.rglob("survival.json"))) == 1  # written once, by rank 0
    if config == "conformer_gn_tiny":  # the importance callback probed at fit end: one report, from rank 0
        reports = list(tmp_path.rglob("probe_step3.json"))
        assert len(reports) == 1 and json.loads(reports[0].read_text())["utterances"] == 9
