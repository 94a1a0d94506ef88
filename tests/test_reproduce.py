"""`experiments/reproduce.py`: one command per paper, resumable, a report row per claim (smoke budget)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end: left out of `scripts/test.sh --fast`

RESULTS = REPO / "experiments" / "results"


def reproduce(corpus, out, paper="zhou", *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"), paper, "--budget", "smoke",
                           "--corpus", str(corpus), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.integration
def test_zhou_reproduction_writes_every_claim_and_resumes(corpus, tmp_path):
    # the landed studies' results, as the script finds them in experiments/results
    shutil.copy(RESULTS / "stability.json", tmp_path)
    for run in [*RESULTS.glob("runs/L[48]_seed*/block.json"),
                *RESULTS.glob("runs/fd_L8_r75b10-ffn-head-conv_seed*/result.json")]:
        dest = tmp_path / run.relative_to(RESULTS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run, dest)
    first = reproduce(corpus, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    report = tmp_path / "zhou" / "REPORT_smoke.md"
    assert f"report: {report}" in first.stdout
    claims = json.loads((tmp_path / "zhou" / "REPORT_smoke.json").read_text())["claims"]
    names = [c["claim"] for c in claims]
    for expected in ("BatchNorm removes the ambient property", "attention churn rises with depth",
                     "ambient and critical layers separate", "layer rankings are stable across training runs",
                     "targeting ambient layers beats targeting critical ones"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    # one seed: no verdict can be more than inconclusive
    assert all(c["verdict"].startswith("inconclusive") for c in claims if "per seed" in c["measured"]
               or "BN − GN" in c["measured"])
    text = report.read_text()
    assert text.count("| GroupNorm (ours) | 0 |") == 1 and "| BatchNorm (NeMo) | 0 |" in text
    done = sorted((tmp_path / "zhou" / "smoke" / "runs").glob("*/done.json"))
    assert len(done) == 3
    stamps = [p.stat().st_mtime_ns for p in done]
    second = reproduce(corpus, tmp_path)  # every run is on disk: nothing retrains, the report is rewritten
    assert second.returncode == 0, second.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in done] == stamps
    assert json.loads((tmp_path / "zhou" / "REPORT_smoke.json").read_text())["claims"] == claims


@pytest.fixture(scope="module")
def tian_smoke(corpus, tmp_path_factory):
    """The Tian reproduction at the smoke budget on the corpus folder: (results root, the first run's output)."""
    out = tmp_path_factory.mktemp("tian")
    return out, reproduce(corpus, out, "tian")


@pytest.mark.integration
def test_tian_reproduction_writes_every_claim_and_resumes(corpus, tian_smoke):
    tmp_path, first = tian_smoke
    assert first.returncode == 0, first.stderr[-4000:]
    report = tmp_path / "tian" / "REPORT_smoke.md"
    assert f"report: {report}" in first.stdout
    claims = json.loads((tmp_path / "tian" / "REPORT_smoke.json").read_text())["claims"]
    names = [c["claim"] for c in claims]
    seeded = ("parameter sharing (PSS) costs a little WER", "with PSS + U(2,8) WER stays flat",
              "without PSS, sampled depth trains a worse model", "shared layers are consistent")
    for expected in seeded:
        assert any(n.startswith(expected) for n in names), (expected, names)
    # one seed: no verdict that rests on seeds can be more than inconclusive
    assert all(c["verdict"].startswith("inconclusive (1 seed)") for c in claims if c["claim"].startswith(seeded))
    # speed is judged from the interleaved benchmark's results, not from the runs' shared-machine wall-clock
    speed = next(c for c in claims if c["claim"].startswith("sampled depth U(2,8) + PSS trains about 42% faster"))
    assert speed["measured"].startswith("interleaved step time") and "below the paper's 1.72×" in speed["verdict"]
    # the per-depth tables of the four models, written by the study script the report reuses
    tables = (tmp_path / "layer_reduction_L8_smoke.md").read_text()
    assert all(f"| {arm} |" in tables for arm in ("unshared fixed", "shared fixed", "shared U(2,8)", "unshared U(2,8)"))
    done = sorted((tmp_path / "runs" / "layer_reduction_L8_smoke").glob("*/result.json"))
    assert len(done) == 4
    stamps = [p.stat().st_mtime_ns for p in done]
    second = reproduce(corpus, tmp_path, "tian")  # every run is on disk: nothing retrains
    assert second.returncode == 0, second.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in done] == stamps
    assert json.loads((tmp_path / "tian" / "REPORT_smoke.json").read_text())["claims"] == claims


@pytest.mark.integration
def test_kubo_reproduction_writes_every_claim_and_resumes(corpus, tmp_path):
    first = reproduce(corpus, tmp_path, "kubo")
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"report: {tmp_path / 'kubo' / 'REPORT_smoke.md'}" in first.stdout
    claims = {c["claim"]: c for c in json.loads((tmp_path / "kubo" / "REPORT_smoke.json").read_text())["claims"]}
    for arm in ("adl", "adl_settled"):
        for expected in ("ADL prunes to 0.45× the parameters", "the pruned model is no worse than dense",
                         "FFN and MHSA units are pruned more than conv units", "input-side (lower) layers are pruned",
                         "(ours) layers that survive pruning are the critical ones"):
            assert any(n.startswith(expected) and n.endswith(f"({arm})") for n in claims), (expected, arm)
        # pruning removes only units the eval mask already zeroes: the pruned model scores as the gated one
        exact = claims[f"(ours) pruning is exact: the pruned model computes what the gated one does ({arm})"]
        assert exact["verdict"] == "reproduced", exact
    assert claims["ADL (adl_settled) beats the hand-made shallow baseline"]["verdict"] == "inconclusive (1 seed)"
    # the baseline was sized to the settled ADL model of its seed: the closest depth, not the dense one
    runs = tmp_path / "runs" / "adaptive_dropout_L8_smoke"
    result = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/result.json")}
    assert set(result) == {"dense_seed0", "adl_seed0", "adl_settled_seed0", "shallow_settled_seed0"}
    assert result["shallow_settled_seed0"]["params"] < result["dense_seed0"]["params"]
    assert "| adl_settled − shallow_settled |" in (tmp_path / "adaptive_dropout_L8_smoke.md").read_text()
    # the longer schedule (c0 = 16, K = 85 %; 8 steps here): its own runs, dense included, and rows with its name
    long = {p.parent.parent.name + "/" + p.parent.name for p in tmp_path.glob("runs/*smoke_long*/*/result.json")}
    assert long == {"adaptive_dropout_L8_smoke_long/dense_seed0",
                    "adaptive_dropout_L8_smoke_long_k0.85_c16/adl_settled_seed0"}, long
    for expected in ("ADL prunes to 0.45× the parameters", "the pruned model is no worse than dense, without "
                     "fine-tuning", "the pruned model's dev WER is no worse than dense's"):
        assert f"{expected} (adl_settled, 8 steps, K = 85%, c₀ = 16)" in claims, expected
    stamps = [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("runs/*/*/result.json"))]
    second = reproduce(corpus, tmp_path, "kubo")  # every run is on disk: nothing retrains
    assert second.returncode == 0, second.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("runs/*/*/result.json"))] == stamps
    assert json.loads((tmp_path / "kubo" / "REPORT_smoke.json").read_text())["claims"] == list(claims.values())


@pytest.mark.integration
def test_fernandez_lopez_reproduction_writes_every_claim_and_resumes(corpus, tmp_path):
    first = reproduce(corpus, tmp_path, "fernandez-lopez")
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"report: {tmp_path / 'fernandez-lopez' / 'REPORT_smoke.md'}" in first.stdout
    claims = {c["claim"]: c for c in json.loads((tmp_path / "fernandez-lopez" / "REPORT_smoke.json").read_text())[
        "claims"]}
    seeded = ("SVD initialization trains more stably than Kaiming",
              "a rank ramp that grows with depth beats a uniform α at equal size",
              "(ours) a probe-ordered rank map beats the linear ramp at equal size")
    for name in seeded:  # one seed: no more than inconclusive
        assert claims[name]["verdict"] == "inconclusive (1 seed)", claims[name]
    assert any(n.startswith("LR-SMS: over 2× fewer parameters") for n in claims)
    assert any(n.startswith("the rank holding 95 % of the energy grows with depth") for n in claims)
    runs = tmp_path / "runs" / "lowrank_L8_smoke"
    result = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/result.json")}
    assert set(result) == {f"{a}_seed0" for a in ("full", "lrsms", "kaiming", "uniform", "reversed", "probe")}
    # every low-rank arm but the uniform one has LR-SMS's size exactly; all are smaller than full rank
    sizes = {k: r["encoder_params"] for k, r in result.items()}
    assert sizes["kaiming_seed0"] == sizes["reversed_seed0"] == sizes["probe_seed0"] == sizes["lrsms_seed0"]
    assert max(sizes[k] for k in sizes if k != "full_seed0") < sizes["full_seed0"]
    stamps = [p.stat().st_mtime_ns for p in sorted(runs.glob("*/result.json"))]
    second = reproduce(corpus, tmp_path, "fernandez-lopez")  # every run is on disk: nothing retrains
    assert second.returncode == 0, second.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in sorted(runs.glob("*/result.json"))] == stamps


@pytest.mark.unit
def test_unknown_paper_is_refused():
    out = subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"), "hinton"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice: 'hinton'" in out.stderr


def test_adaptive_dropout_variants_keep_the_gated_runs_apart_and_share_the_dense_ones(tmp_path, monkeypatch):
    """A schedule variant (K share, α, γ) must not reuse or overwrite the paper-setting gated runs, and compares
    against the dense runs that do not depend on the gates; ``--tag`` (another schedule) keeps every arm apart."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import adaptive_dropout as ad

    paper = argparse.Namespace(layers=8, k_share=0.7, alpha=1e-7, gamma=1e-5)
    k85 = argparse.Namespace(layers=8, k_share=0.85, alpha=1e-7, gamma=1e-5)
    strong = argparse.Namespace(layers=8, k_share=0.7, alpha=1e-4, gamma=1e-2, tag="_e18")
    assert ad.variant(paper) == "" and ad.variant(k85) == "_k0.85" and ad.variant(strong) == "_a0.0001_g0.01"
    assert ad.runs_dir(paper, tmp_path, "adl_settled").name == "adaptive_dropout_L8"
    assert ad.runs_dir(k85, tmp_path, "adl_settled").name == "adaptive_dropout_L8_k0.85"
    assert ad.runs_dir(k85, tmp_path, "dense") == ad.runs_dir(paper, tmp_path, "dense")
    assert ad.runs_dir(strong, tmp_path, "dense").name == "adaptive_dropout_L8_e18"
    assert ad.runs_dir(strong, tmp_path, "adl").name == "adaptive_dropout_L8_e18_a0.0001_g0.01"


def test_kubo_speed_claims_judge_eager_and_exported_inference_apart(monkeypatch):
    """The report's speed rows: eager inference, the TorchScript-exported encoders (when the benchmark timed them)
    and the gated training step, each judged against its target at every batch length."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    from repro.kubo import speed_claims

    def setting(eager, exported, step):
        return {"inference_speedup": eager, "exported_speedup": exported, "gated_step_ratio": step}

    bench = {"param_ratio": 0.407, "settings": {"1s": setting(1.66, 1.86, 1.05), "9s": setting(1.90, 1.96, 1.12)}}
    eager = next(r for r in speed_claims(bench) if "eager" in r["claim"])
    exported = next(r for r in speed_claims(bench) if "TorchScript" in r["claim"])
    step = next(r for r in speed_claims(bench) if "training with gates" in r["claim"])
    assert (eager["verdict"], exported["verdict"], step["verdict"]) == ("not met", "met", "not met on 1 of 2")
    assert "1.66–1.90× faster" in eager["measured"] and "1.86–1.96× faster" in exported["measured"]
    assert speed_claims(None) == []  # no benchmark results: no speed rows
    del bench["settings"]["1s"]["exported_speedup"], bench["settings"]["9s"]["exported_speedup"]
    assert not any("TorchScript" in r["claim"] for r in speed_claims(bench))  # older results: no such row


@pytest.mark.integration
def test_your_own_manifests_give_the_report_the_corpus_folder_gives(corpus, tian_smoke, tmp_path):
    """The offline corpus handed over as plain NeMo manifests (relative audio paths, elsewhere on disk) and a
    tokenizer: the same runs, the same report; the report names the setting."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for split in ("train", "dev", "test"):  # manifests in another folder, audio paths relative to it
        rows = [json.loads(line) for line in (corpus / f"{split}_manifest.json").read_text().splitlines()]
        for r in rows:
            r["audio_filepath"] = os.path.relpath(corpus / r["audio_filepath"], mine)
        (mine / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder, first = tian_smoke
    assert first.returncode == 0, first.stderr[-4000:]
    own = subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"), "tian", "--budget", "smoke",
                          "--train", str(mine / "train.json"), "--dev", str(mine / "dev.json"), "--test",
                          str(mine / "test.json"), "--tokenizer", str(corpus / "tokenizer"),
                          "--out", str(tmp_path / "own")], capture_output=True, text=True, timeout=900)
    assert own.returncode == 0, own.stderr[-4000:]
    a = json.loads((folder / "tian" / "REPORT_smoke.json").read_text())
    b = json.loads((tmp_path / "own" / "tian" / "REPORT_smoke.json").read_text())
    assert b.pop("setting").startswith("model size tiny; data: ") and "setting" not in a

    def measured(report):  # every figure but the runs' wall-clock time, which this shared machine sets
        text = json.dumps(report, ensure_ascii=False)
        return json.loads(re.sub(r"wall-clock per run, [^:]+: [0-9.]+×", "wall-clock", text))

    assert measured(a) == measured(b)  # the same claims, WERs, consistency figures and verdicts
    assert "**Setting:** model size tiny; data: " in (tmp_path / "own" / "tian" / "REPORT_smoke.md").read_text()


@pytest.mark.unit
def test_bad_data_and_size_flags_are_one_line(tmp_path):
    def run(*flags):
        return subprocess.run([sys.executable, str(REPO / "experiments" / "reproduce.py"), *flags],
                              capture_output=True, text=True, timeout=120)

    out = run("tian", "--train", "x.json", "--dev", "y.json")
    assert out.returncode != 0 and "needs all of --train, --dev, --test, --tokenizer (missing: --test, --tokenizer)" \
        in out.stderr
    out = run("kubo", "--size", "M", "--out", str(tmp_path))
    assert out.returncode != 0 and "only --size tiny is supported for kubo" in out.stderr
    out = run("tian", "--help")
    assert out.returncode == 0 and "Budgets:" in out.stdout and "NeMo's Conformer S / M / L" in out.stdout


def _study():
    sys.path.insert(0, str(REPO / "experiments"))
    import study

    return study


@pytest.mark.unit
def test_the_verdict_rule_is_a_paired_t_test():
    study = _study()
    stats = pytest.importorskip("scipy.stats")
    assert [round(float(stats.t.ppf(0.975, df)), 3) for df in range(1, 31)] == list(study.T975)
    # the old rule (every seed's sign and a mean beyond 2 SE) called this reproduced; t = 3.46 < 4.30 at n = 3
    assert study.verdict([0.01, 0.02, 0.03], +1, "spread") == "inconclusive (spread)"
    assert study.verdict([0.010, 0.012, 0.011], +1, "spread") == "reproduced"
    assert study.verdict([-0.010, -0.012, -0.011], +1, "spread") == "refuted"
    assert study.verdict([0.02, 0.021, 0.019, 0.05, 0.04], -1, "spread") == "refuted"  # n = 5: t₀.₉₇₅ = 2.78
    assert study.verdict([0.01], +1, "spread") == "inconclusive (1 seed)"
    assert study.verdict([0.01, 0.01], +1, "spread") == "reproduced"  # identical differences: sd 0, t infinite
    assert (study.size_word(-0.046, -0.087), study.size_word(1.76, 0.06), study.size_word(0.01, 0.2)) == (
        "as the paper's", "larger", "smaller")
    rows = [{"claim": "c", "paper": "p", "measured": "m", "verdict": "v"},
            {"claim": "d", "paper": "p", "measured": "m", "verdict": "met", "criterion": "benchmark target",
             "also_tried": [{"setting": "s", "measured": "m2", "verdict": "v2", "note": "chosen after"}]}]
    table = "\n".join(study.claims_table(rows))
    assert "| c | p | m | paired t-test | **v** |" in table and "| d | p | m | benchmark target | **met** |" in table
    assert "- *d* — s: m2 → **v2** (chosen after)" in table and rows[0]["criterion"] == study.T_TEST


@pytest.mark.unit
@pytest.mark.parametrize("paper", ["zhou", "tian", "kubo", "fernandez-lopez"])
def test_every_committed_claim_names_its_criterion_and_what_else_was_tried(paper):
    for name in ("REPORT.json", "REPORT_small.json"):
        rows = json.loads((RESULTS / paper / name).read_text())["claims"]
        for row in rows:
            assert row["criterion"] and isinstance(row["also_tried"], list), row
            assert all({"setting", "measured", "verdict"} <= set(t) for t in row["also_tried"]), row
        report = (RESULTS / paper / name.replace(".json", ".md")).read_text()
        assert "**Verdict rule.**" in report and "| claim | paper says | we measured | criterion | verdict |" in report


@pytest.mark.integration
def test_a_reproduction_trains_every_run_on_two_processes(corpus, tian_smoke, tmp_path):
    """--devices 2: each run is a 2-process DDP fit (gloo on a CPU) at the preset's global batch; Lightning starts
    rank 1 by running the command again, both ranks go through the same runs, one report line is printed."""
    done = reproduce(corpus, tmp_path, "tian", "--devices", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("report: ") == 1, done.stdout[-2000:]
    text = done.stdout + done.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # a second process took part
    report = json.loads((tmp_path / "tian" / "REPORT_smoke.json").read_text())
    assert "2 devices (DDP) per run" in report["setting"]
    runs = {p.parent.name: json.loads(p.read_text())
            for p in tmp_path.glob("runs/layer_reduction_L8_smoke/*/result.json")}
    single = {p.parent.name: json.loads(p.read_text())
              for p in tian_smoke[0].glob("runs/layer_reduction_L8_smoke/*/result.json")}
    assert set(runs) == set(single) and len(runs) == 4
    assert all(runs[k]["params"] == single[k]["params"] for k in runs)  # the same models, trained on 2 ranks
    bad = reproduce(corpus, tmp_path, "tian", "--devices", "3")
    assert bad.returncode != 0 and "--devices 3 must divide the global batch" in bad.stderr
