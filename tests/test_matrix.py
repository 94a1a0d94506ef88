"""Where capabilities meet: every model-producing operation x every consumer, one table (docs/composition.md).

Each cell either gives the right answer, checked against a plain reference, or refuses with one line naming why:

* the reference of a WER is NeMo's own ``transcribe()`` + ``word_error_rate`` on the model as it is (its inference
  depth, its widths, its norm); the reference of a loss is the model's own encoder forward and loss;
* a probe's baseline (WER and loss) must equal them, a depth sweep's row at the model's depth too;
* an operation that makes a new model (extract, lowrank, prune, set-depth) must keep what the model runs (its
  inference depth) and give a model whose own evaluation is consistent; save/restore must give identical outputs;
* ``layerfx fl`` and the importance callback must accept the model (their pre-flight checks pass, and the
  callback's probe matches the reference) or refuse it by name.

The expected outcome of every cell is written in ``EXPECTED``; a cell that changes (a new refusal, a refusal that
disappears, a wrong number) fails here.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import TINY

import nemo_layerfx  # noqa: F401
from nemo.collections.asr.metrics.wer import word_error_rate
from nemo_layerfx.depth import depth_sweep, set_inference_depth, unshare
from nemo_layerfx.evaluate import audio_batches, model_loss, read_manifest, transcripts, wer
from nemo_layerfx.fd import DropoutPlan, extract
from nemo_layerfx.importance import ProbeConfig, probe
from nemo_layerfx.lowrank import lowrank, merge
from nemo_layerfx.models import clone_model, conformer_encoder, eval_depth, restore
from nemo_layerfx.pruning import prune
from nemo_layerfx.train import compose_config, model_class

OK = "ok"
BASE = ["model.encoder.n_layers=3", "model.encoder.n_heads=4"]  # d_model 32: 4 heads of 8, 4 GN groups of 8
GATES = "+model.encoder.adaptive_dropout={locations: [ffn, qk, v, conv], steps: 10}"
STOCK = ["model.encoder._target_=nemo.collections.asr.modules.ConformerEncoder",
         "model.encoder.conv_norm_type=batch_norm"]


def build(corpus: Path, tmp: Path, *extra: str, name: str = "conformer_gn_tiny"):
    cfg = compose_config(name, TINY + BASE + [f"corpus_dir={corpus}", f"exp_manager.exp_dir={tmp}", *extra])
    torch.manual_seed(0)
    model = model_class(cfg)(cfg=cfg.model).eval()
    with torch.no_grad():  # a trained-looking model: every layer away from its init, depths differ
        for p in conformer_encoder(model).parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _close_half_the_gates(model):
    from nemo_layerfx.pruning import gates_of

    model.encoder.adaptive_dropout_schedule.step.fill_(10)  # c(t) = c_inf: the gates decide
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in gates_of(model):
            for g in layer.values():
                g.beta_prime.normal_(0.0, 0.3)
                g.beta_prime[0] = 0.5
    return model


def _gated(corpus, tmp):
    return _close_half_the_gates(build(corpus, tmp, GATES))


def _stock_gated(corpus, tmp):
    """NeMo's BatchNorm model with FFN / attention gates (add_gates adopts it, its BatchNorm kept)."""
    from nemo_layerfx.pruning import add_gates

    return _close_half_the_gates(add_gates(build(corpus, tmp, *STOCK), {"locations": ["ffn", "qk", "v"], "steps": 10}))


def _convert_norm(corpus, tmp):
    from nemo_layerfx.convert import convert_norm

    stock = build(corpus, tmp, *STOCK)
    stock.save_to(str(tmp / "stock.nemo"))
    convert_norm(tmp / "stock.nemo", tmp / "converted.nemo", groups=4)
    return restore(tmp / "converted.nemo").eval()


# model-producing operations: name -> (corpus, tmp folder) -> a model
PRODUCERS = {
    "dense": lambda c, t: build(c, t),
    "stock": lambda c, t: build(c, t, *STOCK),  # NeMo's ConformerEncoder, BatchNorm
    "shared": lambda c, t: build(c, t, "+model.encoder.share_layers=1"),
    "sampled-depth": lambda c, t: build(c, t, "+model.encoder.depth_sampling={low: 1, high: 3, seed: 0}"),
    "set-depth": lambda c, t: set_inference_depth(build(c, t), 2),
    "extract": lambda c, t: extract(build(c, t), DropoutPlan.flat(3, 0.5, kinds=("ffn", "head", "conv")))[0],
    "lowrank": lambda c, t: lowrank(build(c, t), {"att": 0.5, "ffn": 0.5})[0],
    "merge": lambda c, t: merge(lowrank(build(c, t), {"att": 0.5, "ffn": 0.5})[0])[0],
    "gated": _gated,
    "stock-gated": _stock_gated,
    "prune": lambda c, t: prune(_gated(c, t))[0],
    "unshare": lambda c, t: unshare(build(c, t, "+model.encoder.share_layers=1")),
    "convert-norm": _convert_norm,
}

SHARED = r"shares parameters between layers \(share_layers=1\)"
LOW_RANK_FD = r"low-rank|factorized"
NO_GATES = r"has no adaptive_dropout gates"
NO_GROUPS = r"a BatchNorm or LayerNorm conv norm has no groups to drop"
# (producer, consumer) -> OK, or a regex of the one-line refusal. Documented in docs/composition.md.
EXPECTED: dict[str, dict[str, str]] = {
    "dense": {},
    "stock": {"extract": NO_GROUPS, "fl": NO_GROUPS},  # lowrank and set-depth adopt it (its own BatchNorm kept)
    "shared": {"probe-block": SHARED, "probe-module": SHARED, "extract": SHARED, "callback": SHARED, "fl": SHARED},
    "sampled-depth": {},
    "set-depth": {},
    "extract": {},
    "lowrank": {"extract": LOW_RANK_FD, "lowrank": r"already has factorized", "fl": LOW_RANK_FD},
    "merge": {},
    "stock-gated": {"extract": NO_GROUPS, "lowrank": r"GatedInput.*`layerfx prune`", "fl": NO_GROUPS},
    "gated": {"extract": r"is a GatedInput, not a dense layer.*`layerfx prune`", "lowrank": r"GatedInput.*`layerfx prune`",
              "fl": r"GatedInput, not a dense layer"},
    "prune": {},
    "unshare": {},
    "convert-norm": {},
}
for _p, _row in EXPECTED.items():
    if "gated" not in _p:
        _row.setdefault("prune", NO_GATES)
CONSUMERS = ("probe-block", "probe-module", "depth-sweep", "extract", "lowrank", "prune", "set-depth", "transcribe",
             "eval", "save-restore", "callback", "fl")


@lru_cache(maxsize=None)
def _cached(producer: str, corpus: str, tmp: str):
    return PRODUCERS[producer](Path(corpus), Path(tmp))


@pytest.fixture(scope="module")
def made(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    return lambda producer: clone_model(_cached(producer, str(corpus), str(tmp)))


@torch.no_grad()
def reference(model, manifest: Path) -> tuple[float, float, list[str]]:
    """NeMo's transcribe() + word_error_rate, and the loss of the model's own forward (mean over utterances)."""
    rows = read_manifest(manifest)
    files, texts = [r["audio_filepath"] for r in rows], [r["text"] for r in rows]
    hyps = [h.text if hasattr(h, "text") else h for h in model.transcribe(files, batch_size=4, verbose=False)]
    model.eval()
    loss = 0.0
    for audio, lengths, batch_texts in audio_batches(rows, 16, model._cfg.sample_rate, "cpu"):
        feats, flen = model.preprocessor(input_signal=audio, length=lengths)
        enc, enc_len = model.encoder(audio_signal=feats, length=flen)
        loss += float(model_loss(model, enc, enc_len, batch_texts)) * len(batch_texts)
    return float(word_error_rate(hypotheses=hyps, references=texts)), loss / len(rows), hyps


def consume(consumer: str, model, corpus: Path, tmp: Path) -> None:
    """Run ``consumer`` on ``model`` and check its answer against the plain reference (raises ValueError on a
    refusal, AssertionError on a wrong answer)."""
    manifest = corpus / "dev_manifest.json"
    depth = eval_depth(conformer_encoder(model))
    if consumer in ("probe-block", "probe-module"):
        report = probe(model, manifest, ProbeConfig(unit=consumer.split("-")[1], bootstrap=0))
        ref_wer, ref_loss, _ = reference(model, manifest)
        assert report.baseline_wer == pytest.approx(ref_wer, abs=1e-12)
        assert report.baseline_loss == pytest.approx(ref_loss, rel=1e-4)
        assert len({u.split(".")[1] for u in report.units}) == depth  # the layers the model runs, no more
    elif consumer == "depth-sweep":
        report = depth_sweep(model, manifest, batch_size=16)
        ref_wer, ref_loss, _ = reference(model, manifest)
        assert report.depths == list(range(1, depth + 1))
        assert report.wer[-1] == pytest.approx(ref_wer, abs=1e-12)
        assert report.loss[-1] == pytest.approx(ref_loss, rel=1e-4)
    elif consumer in ("extract", "lowrank", "prune", "set-depth"):
        if consumer == "extract":
            new = extract(model, DropoutPlan.flat(len(conformer_encoder(model).layers), 0.5, kinds=("ffn",)))[0]
        elif consumer == "lowrank":
            new = lowrank(model, {"ffn": 0.5})[0]
        elif consumer == "prune":
            new = prune(model)[0]
        else:
            new = set_inference_depth(clone_model(model), 1)
        want = 1 if consumer == "set-depth" else depth
        assert eval_depth(conformer_encoder(new)) == want  # what the model runs is kept (or set)
        hyps, refs, _ = transcripts(new, manifest)
        assert wer(hyps, refs) == pytest.approx(reference(new, manifest)[0], abs=1e-12)
        new.save_to(str(tmp / f"{consumer}.nemo"))  # and it saves and restores as what it is
        back = restore(tmp / f"{consumer}.nemo")
        assert eval_depth(conformer_encoder(back)) == want
    elif consumer == "eval":  # layerfx eval's numbers: NeMo's transcribe() + word_error_rate, the depth it runs
        from nemo_layerfx.evaluate import evaluate

        report = evaluate(model, manifest, bootstrap=100)
        assert report.wer == pytest.approx(reference(model, manifest)[0], abs=1e-12)
        assert report.depth == depth and report.wer_ci[0] <= report.wer <= report.wer_ci[1]
    elif consumer == "transcribe":
        hyps, refs, _ = transcripts(model, manifest)
        assert reference(model, manifest)[2] == hyps
    elif consumer == "save-restore":
        from conftest import encoded

        path = tmp / "round_trip.nemo"
        model.save_to(str(path))
        back = restore(path)
        a, b = encoded(model)[0], encoded(back)[0]
        assert a.shape == b.shape and torch.equal(a, b)
    elif consumer == "callback":
        callback_cell(model, corpus, tmp)
    elif consumer == "fl":
        from nemo_layerfx.fl.task import FLConfig, check_run

        path = tmp / "global.nemo"
        model.save_to(str(path))
        check_run(FLConfig(model=str(path), corpus=str(corpus), out=str(tmp / "fl"),
                           plan={"type": "flat", "rate": 0.5, "kinds": ["ffn"]}))
    else:
        raise KeyError(consumer)


def callback_cell(model, corpus: Path, tmp: Path) -> None:
    """The importance callback in a real (one-step) Lightning fit: its report's baseline is the reference's."""
    import lightning.pytorch as pl

    from nemo_layerfx.importance.callback import LayerImportanceCallback

    cb = LayerImportanceCallback(manifest=str(corpus / "dev_manifest.json"), out_dir=str(tmp / "importance"),
                                 modes=["reinit"], bootstrap=0)
    model.setup_training_data(model.cfg.train_ds)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         num_sanity_val_steps=0, limit_val_batches=0)
    model.set_trainer(trainer)
    trainer.fit(model)
    report = json.loads((tmp / "importance" / "probe_step1.json").read_text())
    ref_wer, ref_loss, _ = reference(model, corpus / "dev_manifest.json")
    assert report["baseline_wer"] == pytest.approx(ref_wer, abs=1e-12)
    assert report["baseline_loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert len(report["units"]) == eval_depth(conformer_encoder(model))


FAST_ROWS = ("dense", "stock", "set-depth")  # the rest of the matrix runs in the full suite only


@pytest.mark.integration
@pytest.mark.parametrize("producer", [p if p in FAST_ROWS else pytest.param(p, marks=pytest.mark.slow)
                                      for p in PRODUCERS])
def test_every_consumer_answers_right_or_refuses_by_name(producer, made, corpus, tmp_path):
    got: dict[str, str] = {}
    for consumer in CONSUMERS:
        cell = tmp_path / consumer
        cell.mkdir()
        try:
            consume(consumer, made(producer), corpus, cell)
            got[consumer] = OK
        except (ValueError, NotImplementedError, FileNotFoundError) as e:
            message = str(e)
            assert "\n" not in message.strip(), f"{producer} x {consumer}: a refusal is one line: {message!r}"
            got[consumer] = message
    wrong = {}
    for consumer in CONSUMERS:
        want = EXPECTED[producer].get(consumer, OK)
        if (want == OK) != (got[consumer] == OK) or (want != OK and not re.search(want, got[consumer])):
            wrong[consumer] = f"expected {want!r}, got {got[consumer]!r}"
    assert not wrong, f"{producer}: " + "; ".join(f"{c}: {w}" for c, w in wrong.items())


@pytest.mark.unit
def test_the_documented_matrix_is_the_tested_one():
    """docs/composition.md shows ✓ exactly where EXPECTED says the cell gives an answer."""
    lines = (Path(__file__).resolve().parents[1] / "docs" / "composition.md").read_text().splitlines()
    table = [line.strip("|").split("|") for line in lines if line.startswith("| ") and "---" not in line]
    header, rows = [c.strip() for c in table[0][1:]], table[1:]
    names = {"probe block": "probe-block", "probe module": "probe-module", "save/restore": "save-restore"}
    assert [names.get(h, h) for h in header] == list(CONSUMERS)
    assert len(rows) == len(PRODUCERS)
    for row, producer in zip(rows, PRODUCERS):
        assert row[0].strip().split(" (")[0].replace("sampled depth", "sampled-depth") == producer
        for consumer, cell in zip(CONSUMERS, row[1:]):
            assert (cell.strip() == "✓") == (EXPECTED[producer].get(consumer, OK) == OK), (producer, consumer, cell)
