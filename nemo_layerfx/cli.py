"""``layerfx``: the things users do outside training.

    layerfx make-corpus --preset commands --out data/commands
    layerfx convert-norm pretrained.nemo pretrained_gn.nemo --groups 8
    layerfx probe model.nemo --manifest dev_manifest.json --mode rerand --draws 3
    layerfx compare runs/a/probe.json runs/b/probe.json
    layerfx extract model.nemo client.nemo --rate 0.5 --kinds ffn head conv --seed 3
    layerfx fl --config-name fd_ambient model=runs/pretrained.nemo plan.report=runs/probe/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys


def _make_corpus(args: argparse.Namespace) -> int:
    from nemo_layerfx.corpus import CorpusConfig, make_corpus

    cfg = CorpusConfig(out=args.out, preset=args.preset, n=args.n, speakers=args.speakers, seed=args.seed,
                       workers=args.workers, dev_frac=args.dev_frac, test_frac=args.test_frac, vocab=args.vocab,
                       vocab_size=args.vocab_size)
    info = make_corpus(cfg)
    print(json.dumps({k: info[k] for k in ("utterances", "hours", "speakers", "words", "tokenizer")}, indent=2))
    print(f"corpus written to {args.out}")
    return 0


def _convert_norm(args: argparse.Namespace) -> int:
    from nemo_layerfx.convert import convert_norm

    report = convert_norm(args.input, args.output, groups=args.groups)
    for line in report.lines():
        print(line)
    print(f"wrote {args.output} (input {args.input} unchanged); fine-tune it: the norm it was trained with changed")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nemo_layerfx.convert import restore
    from nemo_layerfx.importance import ProbeConfig, plot_report, probe

    modes = ("reinit", "rerand") if args.mode == "both" else (args.mode,)
    cfg = ProbeConfig(modes=modes, unit=args.unit, draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                      max_utterances=args.max_utterances, ambient_rel_threshold=args.threshold,
                      n_ambient=args.n_ambient, batch_variants=args.batch_variants)
    if "reinit" in modes and args.init is None:
        raise ValueError("--mode reinit needs --init INIT.safetensors (the step-0 snapshot saved at fit start); "
                         "a pretrained .nemo does not carry its initial weights, so only --mode rerand is possible")
    model = restore(args.model)
    if args.device:
        model = model.to(args.device)
    try:
        from tqdm import tqdm

        bar = tqdm(desc="probe", unit="pass", leave=False)
        progress = lambda msg: bar.update(1)  # noqa: E731
    except ImportError:  # pragma: no cover
        bar, progress = None, None
    report = probe(model, args.manifest, cfg, init=args.init, progress=progress)
    if bar is not None:
        bar.close()
    out = Path(args.out)
    report.to_json(out / "probe.json")
    plot_report(report, out / "probe.png")
    print(report.table())
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nemo_layerfx.convert import restore
    from nemo_layerfx.fd import DropoutPlan, extract

    if Path(args.output).resolve() == Path(args.model).resolve():
        raise ValueError(f"refusing to overwrite the input model {args.model}; give a different output path")
    model = restore(args.model)
    n = len(model.encoder.layers)
    if args.report:
        plan = DropoutPlan.targeted(args.report, n=args.n, rate=args.rate, base_rate=args.base_rate,
                                    target=args.target, kinds=tuple(args.kinds))
    else:
        plan = DropoutPlan.flat(n, args.rate, kinds=tuple(args.kinds))
    sub, units = extract(model, plan, seed=args.seed)
    full, small = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in sub.parameters())
    tmp = Path(args.output).with_suffix(".tmp.nemo")
    sub.save_to(str(tmp))
    tmp.replace(args.output)
    print(f"{plan.label}: {small:,} of {full:,} parameters ({small / full:.1%}); wrote {args.output}")
    return 0


def _fl(args: argparse.Namespace) -> int:
    from hydra import compose, initialize_config_dir

    from nemo_layerfx.fl import FLConfig, simulate
    from nemo_layerfx.train import CONF_DIR

    with initialize_config_dir(config_dir=f"{CONF_DIR}/federated", version_base=None):
        cfg = compose(config_name=args.config_name, overrides=args.overrides)
    result = simulate(FLConfig.from_mapping(cfg))
    for row in result["rounds"]:
        dropped = "; ".join(f"client {d['client']}: {d['reason']}" for d in row.get("dropped", []))
        print(f"round {row['round']}: dev WER {row['dev_wer']:.4f}  clients {len(row.get('clients', []))}"
              + (f"  dropped: {dropped}" if dropped else ""))
    print(f"checkpoint: {result['checkpoint']}  metrics: {result['plot']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nemo_layerfx.importance import compare_reports

    reports = []
    for path in args.reports:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such probe report: {path}")
        reports.append(json.loads(Path(path).read_text()))
    result = compare_reports(reports, mode=args.mode, top_n=args.top_n)
    for p in result["pairs"]:
        print(f"{args.reports[p['a']]}  vs  {args.reports[p['b']]}: spearman {p['spearman']:+.3f}, "
              f"top-{args.top_n} ambient overlap {p[f'top{args.top_n}_ambient_overlap']:.2f} "
              f"({', '.join(p['ambient_a'])} | {', '.join(p['ambient_b'])})")
    print(f"mean spearman {result['mean_spearman']:+.3f}, mean overlap {result['mean_overlap']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerfx", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("make-corpus", help="synthesize an offline speech corpus with espeak-ng",
                       epilog="example: layerfx make-corpus --preset commands --n 1000 --out data/commands",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--preset", default="commands", choices=["commands", "sentences"])
    c.add_argument("--n", type=int, default=1000, help="utterances in total")
    c.add_argument("--speakers", type=int, default=24, help="distinct voices (1-152)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=2, help="synthesis processes (output does not depend on it)")
    c.add_argument("--dev-frac", type=float, default=0.1)
    c.add_argument("--test-frac", type=float, default=0.1)
    c.add_argument("--vocab", type=int, default=0, help="sentences: keep sentences of the K commonest words")
    c.add_argument("--vocab-size", type=int, default=0,
                   help="tokenizer pieces (0: preset default, -1: no tokenizer)")
    c.set_defaults(func=_make_corpus)

    n = sub.add_parser("convert-norm", help="BatchNorm Conformer .nemo -> padding-exact GroupNorm .nemo",
                       epilog="example: layerfx convert-norm stt_conformer.nemo stt_conformer_gn8.nemo --groups 8")
    n.add_argument("input", help="a Conformer .nemo (never modified)")
    n.add_argument("output", help="where to write the converted .nemo")
    n.add_argument("--groups", type=int, default=8, help="GroupNorm groups; must divide d_model")
    n.set_defaults(func=_convert_norm)

    pr = sub.add_parser("probe", help="ambient / critical Conformer layers of a .nemo by re-init / re-rand",
                        epilog="example: layerfx probe model.nemo --manifest data/commands/dev_manifest.json "
                               "--mode rerand --draws 3 --out runs/probe",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("model", help="a NeMo Conformer .nemo (CTC, RNNT or hybrid)")
    pr.add_argument("--manifest", required=True, help="NeMo manifest of the evaluation utterances")
    pr.add_argument("--mode", default="rerand", choices=["rerand", "reinit", "both"])
    pr.add_argument("--init", default=None, help="step-0 layer snapshot (.safetensors), needed for reinit")
    pr.add_argument("--draws", type=int, default=1, help="re-rand draws averaged per unit")
    pr.add_argument("--unit", default="block", choices=["block", "module"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--threshold", type=float, default=0.10, help="ambient if WER <= baseline x (1 + threshold)")
    pr.add_argument("--n-ambient", type=int, default=None, help="label the n least important units ambient")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--max-utterances", type=int, default=None)
    pr.add_argument("--batch-variants", type=int, default=1,
                    help="resets of one layer evaluated as one batch through the layers after it (GPU: 8)")
    pr.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (cpu)")
    pr.add_argument("--out", default="runs/probe", help="folder for probe.json and probe.png")
    pr.set_defaults(func=_probe)

    ex = sub.add_parser("extract", help="a federated-dropout submodel of a GroupNorm Conformer .nemo, as a .nemo",
                        epilog="example: layerfx extract model.nemo client.nemo --rate 0.5 --kinds ffn head conv",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("model", help="a GroupNorm Conformer .nemo (never modified)")
    ex.add_argument("output", help="where to write the submodel .nemo")
    ex.add_argument("--rate", type=float, default=0.5, help="dropout rate (fraction of units dropped)")
    ex.add_argument("--kinds", nargs="+", default=["ffn"], choices=["ffn", "head", "conv"])
    ex.add_argument("--report", default=None, help="a probe.json: apply --rate to --n targeted layers only")
    ex.add_argument("--target", default="ambient", choices=["ambient", "critical"])
    ex.add_argument("--n", type=int, default=2)
    ex.add_argument("--base-rate", type=float, default=0.0, help="with --report: the rate on the other layers")
    ex.add_argument("--seed", type=int, default=0, help="which units are kept")
    ex.set_defaults(func=_extract)

    fl = sub.add_parser("fl", help="federated dropout on Flower's simulation engine (conf/federated/*.yaml)",
                        epilog="example: layerfx fl --config-name fd_flat model=runs/pretrained.nemo rounds=5")
    fl.add_argument("--config-name", default="fd_flat", help="fd_flat, fd_ambient, fd_critical or your own")
    fl.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. plan.rate=0.3 num_clients=8")
    fl.set_defaults(func=_fl)

    cp = sub.add_parser("compare", help="agreement of layer rankings across probe reports",
                        epilog="example: layerfx compare runs/seed0/probe.json runs/seed1/probe.json --top-n 2")
    cp.add_argument("reports", nargs="+", help="probe.json files of `layerfx probe` or the callback")
    cp.add_argument("--mode", default="rerand", choices=["rerand", "reinit"])
    cp.add_argument("--top-n", type=int, default=2, help="size of the most-ambient sets to overlap")
    cp.add_argument("--out", default=None, help="also write the comparison as JSON here")
    cp.set_defaults(func=_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"layerfx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
