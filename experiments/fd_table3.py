"""Zhou et al.'s Table 3 at a depth where ambient blocks exist, over several seeds: Amb-2 vs Crit-2 vs Flat.

Per seed: pretrain a GroupNorm Conformer-CTC (tiny preset, ``--layers`` deep) on the first half of the corpus's
speakers, probe its blocks (re-rand) on the held-out speakers' dev+test utterances, then adapt it on Flower's
simulation engine with one client per held-out speaker and FFN federated dropout:
Amb-2 (50 % on the 2 most ambient blocks, 10 % elsewhere), Crit-2 (the same on the 2 most critical) and Flat at
the same dropped fraction, plus no dropout. Same pretrained model, client data and seeds for every plan, so the
plans are compared pairwise within a seed. Seeds already in ``--out`` are kept (run them in separate calls); a
stopped seed goes on where it stopped: its model, probe and finished plans are kept, and a plan stopped mid-run
resumes from its last completed round.

    python experiments/fd_table3.py --corpus data/commands --layers 8 --seeds 0 1 2 3 4 --out experiments/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from nemo.utils import logging

import nemo_layerfx
from nemo_layerfx.models import restore
from nemo_layerfx.fl import FLConfig, simulate
from nemo_layerfx.fl.task import read_metrics
from nemo_layerfx.importance import ProbeConfig, probe
from nemo_layerfx.train import compose_config, train


def _rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        r["audio_filepath"] = str((path.parent / r["audio_filepath"]).resolve())
        out.append(r)
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def split_corpus(corpus: Path, work: Path, clients: int) -> tuple[Path, Path]:
    """Pretraining manifest (first half of the speakers) and an FL corpus of held-out speakers (clients + dev)."""
    train_rows = _rows(corpus / "train_manifest.json")
    speakers = sorted({r["speaker"] for r in train_rows})
    held_out = speakers[len(speakers) // 2:][:clients]
    pretrain = work / "pretrain_manifest.json"
    _write(pretrain, [r for r in train_rows if r["speaker"] not in speakers[len(speakers) // 2:]])
    fl = work / "fl_corpus"
    for s in held_out:
        _write(fl / "clients" / f"{s}.json", [r for r in train_rows if r["speaker"] == s])
    dev = [r for split in ("dev", "test") for r in _rows(corpus / f"{split}_manifest.json") if r["speaker"] in held_out]
    _write(fl / "dev_manifest.json", dev)
    return pretrain, fl


def plans(n_layers: int, report: Path, rate: float = 0.5, base_rate: float = 0.1,
          kinds: tuple[str, ...] = ("ffn",)) -> dict[str, dict]:
    """Dropout plans at one dropped fraction: (2 x rate + (N - 2) x base_rate) / N (0.2 at 8 layers, defaults)."""
    flat = (2 * rate + (n_layers - 2) * base_rate) / n_layers
    targeted = {"n": 2, "rate": rate, "base_rate": base_rate, "report": str(report), "kinds": list(kinds)}
    return {"no FD": {"type": "flat", "rate": 0.0, "kinds": list(kinds)},
            f"Flat {flat:.0%}": {"type": "flat", "rate": flat, "kinds": list(kinds)},
            "Amb-2": {"type": "ambient", **targeted}, "Crit-2": {"type": "critical", **targeted}}


def variant(args: argparse.Namespace) -> str:
    """'' for the default plans (50 % / 10 %, FFN), else a tag naming the rates and kinds, e.g. '_r75b10-ffn-conv'."""
    if (args.rate, args.base_rate, tuple(args.kinds)) == (0.5, 0.1, ("ffn",)):
        return ""
    return f"_r{round(args.rate * 100)}b{round(args.base_rate * 100)}-{'-'.join(args.kinds)}"


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> None:
    base = out / "runs" / f"fd_L{args.layers}_seed{seed}"
    run = out / "runs" / f"fd_L{args.layers}{variant(args)}_seed{seed}"
    if (run / "result.json").is_file():
        print(f"seed {seed}: kept {run / 'result.json'}")
        return
    t0 = time.perf_counter()
    pretrain, fl = split_corpus(Path(args.corpus), run, args.clients)
    reused = run != base and (base / "result.json").is_file()  # a variant reuses the seed's model, probe, no FD
    if reused:
        pretrained = base / "pretrained.nemo"
        model = restore(pretrained)
        (run / "probe.json").write_text((base / "probe.json").read_text())
        print(f"seed {seed}: pretrained model and probe from {base}", flush=True)
    elif (run / "probe.json").is_file():  # a stopped run: the probe is written after the model is saved
        pretrained = run / "pretrained.nemo"
        model = restore(pretrained)
        print(f"seed {seed}: pretrained model and probe kept from a stopped run", flush=True)
    else:
        pretrained = run / "pretrained.nemo"
        model = pretrain_and_probe(args, seed, run, pretrain, fl)
    result = {"seed": seed, "layers": args.layers, "probe": json.loads((run / "probe.json").read_text()), "plans": {}}
    full = sum(q.numel() for q in model.parameters())
    for name, spec in plans(args.layers, run / "probe.json", args.rate, args.base_rate, tuple(args.kinds)).items():
        if name == "no FD" and reused:  # no dropout is the same run whatever the kinds
            result["plans"][name] = json.loads((base / "result.json").read_text())["plans"][name]
            continue
        res = finished(run / "fl" / name, args.rounds) or simulate(FLConfig(
            model=str(pretrained), corpus=str(fl), out=str(run / "fl" / name), rounds=args.rounds,
            local_steps=args.local_steps, batch_size=8, client_lr=0.1, clip_grad=1.0, plan=spec, seed=seed))
        result["plans"][name] = {"spec": spec, "wer": [r["dev_wer"] for r in res["rounds"]],
                                 "client_params": res["rounds"][-1]["clients"][0]["params"] / full}
        print(f"seed {seed} {name}: WER per round {[round(w, 4) for w in result['plans'][name]['wer']]}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0)
    (run / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def finished(out: Path, rounds: int) -> dict | None:
    """The metrics of a plan that a stopped run already completed, else None (simulate resumes mid-run ones)."""
    rows = read_metrics(out)
    return {"rounds": rows} if rows and rows[-1]["round"] == rounds and (out / "global.nemo").is_file() else None


def pretrain_and_probe(args: argparse.Namespace, seed: int, run: Path, pretrain: Path, fl: Path) -> torch.nn.Module:
    """Train the seed's model on the pretraining speakers, save it as run/pretrained.nemo, probe it on dev."""
    cfg = compose_config("conformer_gn_tiny", [
        f"corpus_dir={Path(args.corpus).resolve()}", f"model.train_ds.manifest_filepath={pretrain}",
        f"model.encoder.n_layers={args.layers}", f"layerfx.seed={seed}", f"trainer.max_epochs={args.epochs}",
        "trainer.accelerator=cpu", "trainer.check_val_every_n_epoch=1000", f"exp_manager.exp_dir={run / 'exp'}",
        "exp_manager.create_checkpoint_callback=false", "layerfx.report_wer=false",
        f"layerfx.save_to={run / 'pretrained.nemo'}"])
    model = train(cfg)
    report = probe(model, fl / "dev_manifest.json", ProbeConfig(modes=("rerand",), draws=args.draws, seed=seed))
    report.to_json(run / "probe.json")
    print(report.table(), flush=True)
    return model


def summarize(out: Path, layers: int, tag: str = "") -> str:
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"fd_L{layers}{tag}_seed*/result.json"))]
    if not results:
        return "no finished seeds"
    names = list(results[0]["plans"])
    spec = results[0]["plans"]["Amb-2"]["spec"]
    words = sum(len(r["text"].split()) for r in _rows(Path(out / "runs" / f"fd_L{layers}{tag}_seed{results[0]['seed']}"
                                                            / "fl_corpus" / "dev_manifest.json")))
    lines = [f"# Importance-targeted federated dropout, {layers} layers (Zhou Table 3 setting)", "",
             f"nemo_layerfx {nemo_layerfx.__version__}, torch {torch.__version__}, {platform.machine()}, CPU; "
             f"{len(results)} seed(s); dev = held-out speakers' dev+test, {words} words (one word = "
             f"{1 / words:.4f} WER)", "",
             f"Plans: Amb-2 / Crit-2 drop {spec['rate']:.0%} of the {' + '.join(spec['kinds'])} units of the 2 most "
             f"ambient / critical blocks and {spec['base_rate']:.0%} elsewhere; Flat drops the same fraction "
             "everywhere; no FD trains the full model. Client size: parameters a client trains / full model.", "",
             "## Probe (re-rand ΔWER per block, mean of draws) and the targeted blocks", "",
             "| seed | baseline WER | ΔWER per block | Amb-2 blocks | Crit-2 blocks |", "|---|---|---|---|---|"]
    for r in results:
        d = r["probe"]["delta_wer"]["rerand"]
        order = sorted(range(len(d)), key=lambda i: d[i])
        lines.append(f"| {r['seed']} | {r['probe']['baseline_wer']:.3f} | {' '.join(f'{x:+.3f}' for x in d)} | "
                     f"{sorted(order[:2])} | {sorted(order[-2:])} |")
    lines += ["", "## Held-out WER after federated adaptation", "",
              "| plan | client size | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean |",
              "|---|---|" + "---|" * (len(results) + 1)]
    lines.append("| before (pretrained) | - | " + " | ".join(f"{r['plans'][names[0]]['wer'][0]:.4f}" for r in results)
                 + f" | {statistics.mean(r['plans'][names[0]]['wer'][0] for r in results):.4f} |")
    for n in names:
        finals = [r["plans"][n]["wer"][-1] for r in results]
        lines.append(f"| {n} | {results[0]['plans'][n]['client_params']:.3f} | "
                     + " | ".join(f"{w:.4f}" for w in finals) + f" | {statistics.mean(finals):.4f} |")
    flat = next(n for n in names if n.startswith("Flat"))
    lines += ["", "Paired differences (per seed; negative: the first plan is better). *final*: WER after the last "
              "round; *rounds*: mean WER over rounds 1..R, less noisy than one evaluation; ± is the standard "
              "deviation over seeds.", "",
              "| difference | final, per seed | final, mean | rounds, per seed | rounds, mean |", "|---|---|---|---|---|"]
    for a, b in (("Amb-2", "Crit-2"), ("Amb-2", flat), ("Crit-2", flat), (flat, "no FD")):
        fin = [r["plans"][a]["wer"][-1] - r["plans"][b]["wer"][-1] for r in results]
        rnd = [statistics.mean(r["plans"][a]["wer"][1:]) - statistics.mean(r["plans"][b]["wer"][1:]) for r in results]
        sd = (lambda xs: f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")
        lines.append(f"| {a} − {b} | {' '.join(f'{x:+.4f}' for x in fin)} | {statistics.mean(fin):+.4f}{sd(fin)} | "
                     f"{' '.join(f'{x:+.4f}' for x in rnd)} | {statistics.mean(rnd):+.4f}{sd(rnd)} |")
    lines += ["", "Per-round WER curves: `runs/fd_L*_seed*/result.json`; Flower metrics and plots under "
              "`runs/fd_L*_seed*/fl/<plan>/`."]
    return "\n".join(lines) + "\n"


def write_table(out: Path, layers: int, tag: str) -> None:
    text = summarize(out, layers, tag)
    (out / f"fd_table3_L{layers}{tag}.md").write_text(text)
    print(text, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a `layerfx make-corpus` folder (commands preset)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=24, help="pretraining epochs on the first half of the speakers")
    p.add_argument("--clients", type=int, default=12, help="held-out speakers that become clients")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--draws", type=int, default=3, help="re-rand draws per block in the probe")
    p.add_argument("--rate", type=float, default=0.5, help="dropout on the 2 targeted blocks")
    p.add_argument("--base-rate", type=float, default=0.1, help="dropout on the other blocks")
    p.add_argument("--kinds", nargs="+", default=["ffn"], help="unit kinds dropped: ffn, head, conv")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--summarize", action="store_true", help="only rewrite the table from the seeds in --out")
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    out, tag = Path(args.out), variant(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        write_table(out, args.layers, tag)
        return
    for seed in args.seeds:
        run_seed(args, seed, out)
        write_table(out, args.layers, tag)  # after every seed, so a stopped run still has its table


if __name__ == "__main__":
    main()
