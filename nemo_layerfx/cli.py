"""What each ``layerfx`` command does. Parsing and flag checks live in ``nemo_layerfx_cli`` (instant help);
``run`` is called with the parsed, checked arguments.

    layerfx make-corpus --preset commands --out data/commands
    layerfx convert-norm pretrained.nemo pretrained_gn.nemo --groups 8
    layerfx probe model.nemo --manifest dev_manifest.json --mode rerand --draws 3
    layerfx compare runs/a/probe.json runs/b/probe.json
    layerfx extract model.nemo client.nemo --rate 0.5 --kinds ffn head conv --seed 3
    layerfx fl --config-name fd_ambient model=runs/pretrained.nemo plan.report=runs/probe/probe.json
    layerfx lowrank model.nemo small.nemo --att 0.1,0.2 --ffn 0.2,0.5
    layerfx merge small.nemo dense.nemo
    layerfx depth-sweep model.nemo --manifest dev_manifest.json --probe runs/probe/probe.json
    layerfx eval model.nemo --manifest test_manifest.json
    layerfx unshare shared.nemo unshared.nemo
    layerfx set-depth model.nemo model_sli5.nemo --depth 5
    layerfx prune gated.nemo pruned.nemo --report runs/survival
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_layerfx.quiet import quiet_console


def _make_corpus(args: argparse.Namespace) -> int:
    from nemo_layerfx.corpus import CorpusConfig, make_corpus

    cfg = CorpusConfig(out=args.out, preset=args.preset, n=args.n, speakers=args.speakers, seed=args.seed,
                       workers=args.workers, dev_frac=args.dev_frac, test_frac=args.test_frac, vocab=args.vocab,
                       vocab_size=args.vocab_size)
    info = make_corpus(cfg, progress=True)
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
    from nemo_layerfx.evaluate import read_manifest
    from nemo_layerfx.importance import plot_report, probe
    from nemo_layerfx.models import restore
    from nemo_layerfx_cli import probe_config

    cfg = probe_config(args)
    read_manifest(args.manifest, args.max_utterances)  # a bad manifest is named before the model loads
    model = restore(args.model)
    if args.device:
        model = model.to(args.device)
    from tqdm import tqdm

    with tqdm(desc="probe", unit="pass", leave=False, file=sys.stderr) as bar:
        report = probe(model, args.manifest, cfg, init=args.init, progress=lambda msg: bar.update(1))
    out = Path(args.out)
    report.to_json(out / "probe.json")
    plot_report(report, out / "probe.png")
    print(report.table())
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from nemo_layerfx.fd import DropoutPlan, extract
    from nemo_layerfx.models import conformer_encoder, restore, save_nemo

    model = restore(args.model)
    n = len(conformer_encoder(model).layers)
    if args.report:
        plan = DropoutPlan.targeted(args.report, n=args.n, rate=args.rate, base_rate=args.base_rate,
                                    target=args.target, kinds=tuple(args.kinds))
    else:
        plan = DropoutPlan.flat(n, args.rate, kinds=tuple(args.kinds))
    sub, units = extract(model, plan, seed=args.seed)
    full, small = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in sub.parameters())
    save_nemo(sub, args.output)
    print(f"{plan.label}: {small:,} of {full:,} parameters ({small / full:.1%}); wrote {args.output}")
    return 0


def _fl(args: argparse.Namespace) -> int:
    from hydra import compose, initialize_config_dir

    from nemo_layerfx.fl import FLConfig, simulate
    from nemo_layerfx.train import CONF_DIR

    folder, name = f"{CONF_DIR}/federated", args.config_name
    if name.endswith((".yaml", ".yml")):  # the user's own config file
        folder, name = str(Path(name).resolve().parent), Path(name).stem
    with initialize_config_dir(config_dir=folder, version_base=None):
        cfg = compose(config_name=name, overrides=args.overrides)
    result = simulate(FLConfig.from_mapping(cfg))
    for row in result["rounds"]:
        dropped = "; ".join(f"client {d['client']}: {d['reason']}" for d in row.get("dropped", []))
        print(f"round {row['round']}: dev WER {row['dev_wer']:.4f}  clients {len(row.get('clients', []))}"
              + (f"  dropped: {dropped}" if dropped else ""))
    print(f"checkpoint: {result['checkpoint']}  metrics: {result['plot']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from nemo_layerfx.importance import compare_reports
    from nemo_layerfx.models import read_report

    reports = [read_report(path) for path in args.reports]
    result = compare_reports(reports, mode=args.mode, top_n=args.top_n, labels=args.labels)
    what = "ambient-label overlap (Jaccard)" if args.labels else f"top-{args.top_n} ambient overlap"
    for p in result["pairs"]:
        rho = f"{p['spearman']:+.3f}" if p["same_units"] else "n/a (different depths: relative positions)"
        print(f"{args.reports[p['a']]}  vs  {args.reports[p['b']]}: spearman {rho}, "
              f"{what} {p['overlap']:.2f} ({', '.join(p['ambient_a'])} | {', '.join(p['ambient_b'])})")
    print(f"mean spearman {result['mean_spearman']:+.3f}, mean overlap {result['mean_overlap']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _lowrank(args: argparse.Namespace) -> int:
    from nemo_layerfx.lowrank import lowrank_file
    from nemo_layerfx_cli import lowrank_config

    report = lowrank_file(args.input, args.output, lowrank_config(args))
    for line in report.lines():
        print(line)
    print(f"wrote {args.output} (input {args.input} unchanged)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from nemo_layerfx.lowrank import merge_file

    report = merge_file(args.input, args.output)
    for line in report.lines():
        print(line)
    print(f"wrote {args.output} (input {args.input} unchanged)")
    return 0


def _depth_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nemo_layerfx.depth import depth_sweep, plot_sweep
    from nemo_layerfx.depth.sweep import probe_layer_deltas
    from nemo_layerfx.evaluate import read_manifest
    from nemo_layerfx.models import conformer_encoder, eval_depth, read_report, restore

    probe = read_report(args.probe) if args.probe else None
    n = len(read_manifest(args.manifest, args.max_utterances))  # a bad manifest is named before the model loads
    model = restore(args.model)
    if probe is not None:  # a report that cannot sit beside this sweep: said before the sweep runs
        enc = conformer_encoder(model)
        probe_layer_deltas(probe, len(enc.layers) if args.all_layers else eval_depth(enc), args.probe_mode)
    if args.device:
        model = model.to(args.device)
    with tqdm(total=-(-n // args.batch_size), desc="depth sweep", unit="batch", leave=False, file=sys.stderr) as bar:
        report = depth_sweep(model, args.manifest, args.batch_size, args.max_utterances,
                             progress=lambda b: bar.update(1), all_layers=args.all_layers)
    out = Path(args.out)
    report.to_json(out / "depth_sweep.json")
    plot_sweep(report, out / "depth_sweep.png", probe=probe, mode=args.probe_mode)
    print(report.table(probe, args.probe_mode))
    print(f"wrote {out / 'depth_sweep.json'} and {out / 'depth_sweep.png'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from nemo_layerfx.evaluate import evaluate, read_manifest
    from nemo_layerfx.models import restore

    read_manifest(args.manifest, args.max_utterances)  # a bad manifest is named before the model loads
    model = restore(args.model)
    if args.device:
        model = model.to(args.device)
    report = evaluate(model, args.manifest, batch_size=args.batch_size, max_utterances=args.max_utterances,
                      bootstrap=args.bootstrap, ci_level=args.ci_level, seed=args.seed)
    if args.json:
        print(json.dumps({"model": args.model, **asdict(report)}, sort_keys=True))
    else:
        print(f"{args.model} on {args.manifest}")
        for line in report.lines():
            print(line)
    return 0


def _unshare(args: argparse.Namespace) -> int:
    from nemo_layerfx.depth import unshare_file

    counts = unshare_file(args.input, args.output)
    print(f"parameters: {counts['before']:,} -> {counts['after']:,} (every depth owns its layer; same outputs)")
    print(f"wrote {args.output} (input {args.input} unchanged)")
    return 0


def _set_depth(args: argparse.Namespace) -> int:
    from nemo_layerfx.depth import set_depth_file

    n = set_depth_file(args.input, args.output, args.depth or None)
    print(f"inference depth {args.depth or n} of {n} layers; wrote {args.output} (input {args.input} unchanged)")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from nemo_layerfx.models import check_output, restore, save_nemo
    from nemo_layerfx.pruning import plot_survival, prune, survival_report

    check_output(args.input, args.output)
    model = restore(args.input)
    if args.report:
        report = survival_report(model)
        report.to_json(Path(args.report) / "survival.json")
        plot_survival(report, Path(args.report) / "survival.png")
        print(report.table())
    small, pruned = prune(model)
    save_nemo(small, args.output)
    for line in pruned.lines():
        print(line)
    print(f"wrote {args.output} (input {args.input} unchanged)")
    return 0


COMMANDS = {"make-corpus": _make_corpus, "convert-norm": _convert_norm, "probe": _probe, "extract": _extract,
            "fl": _fl, "compare": _compare, "lowrank": _lowrank, "merge": _merge, "depth-sweep": _depth_sweep,
            "eval": _eval, "unshare": _unshare, "set-depth": _set_depth, "prune": _prune}


def run(args: argparse.Namespace) -> int:
    """Run a parsed, checked ``layerfx`` command; a user error ends in one line naming it, exit status 2."""
    try:
        quiet_console(getattr(args, "verbose", False), child_processes=True)
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"layerfx {args.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from nemo_layerfx_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
