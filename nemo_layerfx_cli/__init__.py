"""``layerfx``: the things users do outside training.

Parsing, help and argument checks import nothing but the standard library, so ``layerfx --help`` answers at once
and a bad flag is reported before NeMo is imported or any model is loaded; the command itself runs in
``nemo_layerfx.cli``. (This is a separate top-level package because importing anything under ``nemo_layerfx``
imports NeMo, which takes about ten seconds.)
"""

from __future__ import annotations

import argparse
import os
import sys

EXAMPLES = """examples:
  layerfx make-corpus --preset commands --n 1000 --out data/commands
  layerfx convert-norm pretrained.nemo pretrained_gn.nemo --groups 8
  layerfx probe model.nemo --manifest data/commands/dev_manifest.json --mode rerand --draws 3
  layerfx compare runs/a/probe.json runs/b/probe.json
  layerfx extract model.nemo client.nemo --rate 0.5 --kinds ffn head conv --seed 3
  layerfx fl --config-name fd_ambient model=runs/pretrained.nemo plan.report=runs/probe/probe.json
  layerfx lowrank model.nemo small.nemo --att 0.1,0.2 --ffn 0.2,0.5
  layerfx merge small.nemo dense.nemo
  layerfx depth-sweep model.nemo --manifest data/commands/dev_manifest.json
  layerfx eval model.nemo --manifest data/commands/test_manifest.json
  layerfx unshare shared.nemo unshared.nemo
  layerfx set-depth model.nemo model_sli5.nemo --depth 5
  layerfx prune gated.nemo pruned.nemo --report runs/survival
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help; descriptions and examples keep their line breaks."""


def _command(sub, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}", formatter_class=_Help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerfx", description="nemo_layerfx: the things users do outside training.",
                                epilog=EXAMPLES, formatter_class=_Help)
    p.add_argument("-v", "--verbose", action="store_true", help="show NeMo's and Lightning's info logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = _command(sub, "make-corpus", "synthesize an offline speech corpus with espeak-ng (manifests + tokenizer)",
                 "layerfx make-corpus --preset commands --n 1000 --out data/commands")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--preset", default="commands", choices=["commands", "sentences"],
                   help="commands: 67-word smart-home grammar; sentences: WordNet example sentences")
    c.add_argument("--n", type=int, default=1000, help="utterances in total (all splits)")
    c.add_argument("--speakers", type=int, default=24, help="distinct voices (1-152)")
    c.add_argument("--seed", type=int, default=0, help="utterance i depends only on (seed, i)")
    c.add_argument("--workers", type=int, default=2, help="synthesis processes (the output does not depend on it)")
    c.add_argument("--dev-frac", type=float, default=0.1, help="fraction of sentences held out for dev")
    c.add_argument("--test-frac", type=float, default=0.1, help="fraction of sentences held out for test")
    c.add_argument("--vocab", type=int, default=0, help="sentences: keep sentences of the K commonest words (0: all)")
    c.add_argument("--vocab-size", type=int, default=0,
                   help="tokenizer pieces (0: preset default, -1: no tokenizer)")

    n = _command(sub, "convert-norm", "BatchNorm Conformer .nemo -> padding-exact GroupNorm .nemo (fine-tune after)",
                 "layerfx convert-norm stt_conformer.nemo stt_conformer_gn8.nemo --groups 8")
    n.add_argument("input", help="a Conformer .nemo (never modified)")
    n.add_argument("output", help="where to write the converted .nemo")
    n.add_argument("--groups", type=int, default=8, help="GroupNorm groups; must divide d_model")

    pr = _command(sub, "probe", "ambient / critical Conformer layers of a .nemo by re-init / re-rand",
                  "layerfx probe model.nemo --manifest data/commands/dev_manifest.json --mode rerand --draws 3")
    pr.add_argument("model", help="a NeMo Conformer .nemo (CTC, RNNT or hybrid)")
    pr.add_argument("--manifest", required=True, help="NeMo manifest of the evaluation utterances")
    pr.add_argument("--mode", default="rerand", choices=["rerand", "reinit", "both"],
                    help="rerand: fresh draw from the layer's initializers; reinit: its step-0 values (needs --init)")
    pr.add_argument("--init", default=None, help="step-0 layer snapshot (.safetensors), needed for reinit")
    pr.add_argument("--draws", type=int, default=1, help="re-rand draws averaged per unit")
    pr.add_argument("--unit", default="block", choices=["block", "module"],
                    help="block: a whole Conformer layer; module: its ffn1 / attn / conv / ffn2 separately")
    pr.add_argument("--seed", type=int, default=0, help="seed of the re-rand draws")
    pr.add_argument("--rule", default="relative", choices=["relative", "ci"],
                    help="relative: ambient if WER <= baseline x (1 + --threshold); ci: ambient if not significantly "
                         "worse than the baseline (the bootstrap interval of the WER change reaches 0)")
    pr.add_argument("--threshold", type=float, default=0.10, help="relative rule: the relative WER increase allowed")
    pr.add_argument("--n-ambient", type=int, default=None, help="instead: label the n least important units ambient")
    pr.add_argument("--bootstrap", type=int, default=1000,
                    help="paired bootstrap resamples of the utterances for every unit's interval (0: no intervals)")
    pr.add_argument("--ci-level", type=float, default=0.95, help="level of the intervals")
    pr.add_argument("--batch-size", type=int, default=16, help="utterances per batch")
    pr.add_argument("--max-utterances", type=int, default=None,
                    help="probe on the first N utterances of the manifest (sorted by duration); default: all")
    pr.add_argument("--batch-variants", type=int, default=1,
                    help="resets of one layer evaluated as one batch through the layers after it (GPU: 8)")
    pr.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (cpu)")
    pr.add_argument("--out", default="runs/probe", help="folder for probe.json and probe.png")
    pr.add_argument("--force", action="store_true", help="overwrite the report a previous probe wrote in --out")

    ex = _command(sub, "extract", "a federated-dropout submodel of a GroupNorm Conformer .nemo, as a .nemo",
                  "layerfx extract model.nemo client.nemo --rate 0.5 --kinds ffn head conv")
    ex.add_argument("model", help="a GroupNorm Conformer .nemo (never modified)")
    ex.add_argument("output", help="where to write the submodel .nemo")
    ex.add_argument("--rate", type=float, default=0.5, help="dropout rate: the fraction of units dropped, in [0, 1)")
    ex.add_argument("--kinds", nargs="+", default=["ffn"], choices=["ffn", "head", "conv"],
                    help="unit kinds to drop: FFN hidden units, attention heads, conv GroupNorm groups")
    ex.add_argument("--report", default=None, help="a block-level probe.json: apply --rate to --n targeted layers only")
    ex.add_argument("--target", default="ambient", choices=["ambient", "critical"],
                    help="with --report: which end of the ranking gets --rate (Zhou's Amb-n / Crit-n)")
    ex.add_argument("--n", type=int, default=2, help="with --report: how many layers get --rate")
    ex.add_argument("--base-rate", type=float, default=0.0, help="with --report: the rate on the other layers")
    ex.add_argument("--seed", type=int, default=0, help="which units are kept")

    fl = _command(sub, "fl", "federated dropout on Flower's simulation runtime, via flwr run (conf/federated/*.yaml)",
                  "layerfx fl --config-name fd_flat model=runs/pretrained.nemo rounds=5")
    fl.add_argument("--config-name", default="fd_flat",
                    help="fd_flat, fd_ambient, fd_critical, or the path of your own .yaml (same fields)")
    fl.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. plan.rate=0.3 num_clients=8")

    cp = _command(sub, "compare", "agreement of layer rankings across probe reports",
                  "layerfx compare runs/seed0/probe.json runs/seed1/probe.json --top-n 2")
    cp.add_argument("reports", nargs="+", help="probe.json files of `layerfx probe` or the callback")
    cp.add_argument("--mode", default="rerand", choices=["rerand", "reinit"], help="which reset's WER changes to rank")
    cp.add_argument("--top-n", type=int, default=2, help="size of the most-ambient sets to overlap")
    cp.add_argument("--labels", action="store_true",
                    help="overlap the reports' own ambient labels (e.g. made with --rule ci) instead of the top n")
    cp.add_argument("--out", default=None, help="also write the comparison as JSON here")

    lr = _command(sub, "lowrank", "factorize a trained GroupNorm Conformer's linears by truncated SVD (U·Vᵀ)",
                  "layerfx lowrank model.nemo small.nemo --att 0.1,0.2 --ffn 0.2,0.5")
    lr.add_argument("input", help="a dense GroupNorm Conformer .nemo (never modified)")
    lr.add_argument("output", help="where to write the low-rank .nemo")
    spec = "rank as a fraction of min(m, n): A (uniform), A_I,A_F (linear ramp over blocks) or r:R0,R1,... (ranks)"
    lr.add_argument("--att", default=None, help=f"attention linear_q/k/v/out/pos; {spec}")
    lr.add_argument("--ffn", default=None, help=f"both FFNs' linear1/linear2; {spec}")
    lr.add_argument("--conv", default=None, help=f"the conv module's pointwise convs; {spec}")
    lr.add_argument("--multiple-of", type=int, default=1, help="round ranks up to a multiple of this")

    ds = _command(sub, "depth-sweep", "WER, loss and real-time factor at every inference depth 1..N in one pass, "
                  "with layer consistency", "layerfx depth-sweep model.nemo --manifest data/commands/dev_manifest.json")
    ds.add_argument("model", help="a NeMo Conformer .nemo (CTC, RNNT or hybrid; ours or stock, shared or not)")
    ds.add_argument("--manifest", required=True, help="NeMo manifest of the evaluation utterances")
    ds.add_argument("--probe", default=None, help="a block-level probe.json of the same model, shown beside")
    ds.add_argument("--probe-mode", default="rerand", choices=["rerand", "reinit"],
                    help="which of the probe report's resets to show (default rerand)")
    ds.add_argument("--all-layers", action="store_true",
                    help="a model with an inference depth M (set-depth): sweep all its N layers, not only 1..M")
    ds.add_argument("--batch-size", type=int, default=16, help="utterances per batch")
    ds.add_argument("--max-utterances", type=int, default=None,
                    help="evaluate the first N utterances of the manifest (sorted by duration); default: all")
    ds.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (cpu)")
    ds.add_argument("--out", default="runs/depth", help="folder for depth_sweep.json and depth_sweep.png")
    ds.add_argument("--force", action="store_true", help="overwrite the sweep a previous run wrote in --out")

    ev = _command(sub, "eval", "a .nemo's WER (with a bootstrap interval), real-time factor and parameter count on a "
                  "manifest, as transcribe() decodes it", "layerfx eval model.nemo --manifest data/commands/test_manifest.json")
    ev.add_argument("model", help="a NeMo ASR .nemo (CTC, RNNT or hybrid; any encoder this plugin reads)")
    ev.add_argument("--manifest", required=True,
                    help="NeMo manifest (relative audio paths are resolved against the manifest's folder)")
    ev.add_argument("--batch-size", type=int, default=16, help="utterances per batch")
    ev.add_argument("--max-utterances", type=int, default=None,
                    help="evaluate the first N utterances of the manifest (sorted by duration); default: all")
    ev.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples of the utterances for the WER's interval (0: no interval)")
    ev.add_argument("--ci-level", type=float, default=0.95, help="level of the interval")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    ev.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (cpu)")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object (for scripts)")

    us = _command(sub, "unshare", "a parameter-shared model -> the equivalent unshared model (identical outputs)",
                  "layerfx unshare shared.nemo unshared.nemo")
    us.add_argument("input", help="a .nemo whose encoder has share_layers (never modified)")
    us.add_argument("output", help="where to write the unshared .nemo")

    sd = _command(sub, "set-depth", "export a model that runs only its first M layers at inference (Tian's SLI)",
                  "layerfx set-depth model.nemo model_sli5.nemo --depth 5")
    sd.add_argument("input", help="a GroupNorm Conformer .nemo (never modified)")
    sd.add_argument("output", help="where to write the .nemo with the inference depth")
    sd.add_argument("--depth", type=int, required=True, help="inference depth M in 1..n_layers (0: all layers)")

    pn = _command(sub, "prune", "remove the units an adaptive-dropout model's gates dropped (β < c∞): a dense, "
                  "smaller model with the same outputs", "layerfx prune gated.nemo pruned.nemo --report runs/survival")
    pn.add_argument("input", help="a .nemo trained with model.encoder.adaptive_dropout (never modified)")
    pn.add_argument("output", help="where to write the pruned .nemo")
    pn.add_argument("--report", default=None, help="also write survival.json and survival.png (Kubo's Fig. 2) here")

    mg = _command(sub, "merge", "turn a low-rank model back into a dense one (same outputs)",
                  "layerfx merge small.nemo dense.nemo")
    mg.add_argument("input", help="a low-rank .nemo (never modified)")
    mg.add_argument("output", help="where to write the dense .nemo")
    return p


def _need_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")


def _distinct(src: str, dst: str) -> None:
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError(f"refusing to overwrite the input model {src}; give a different output path")


# config field -> the flag that sets it, so a config class's own check can name the flag
PROBE_FLAGS = {"draws": "--draws", "ambient_rel_threshold": "--threshold", "batch_size": "--batch-size",
               "batch_variants": "--batch-variants", "rule": "--rule", "n_ambient": "--n-ambient",
               "bootstrap": "--bootstrap", "ci_level": "--ci-level", "max_utterances": "--max-utterances",
               "unit": "--unit", "modes": "--mode"}


def _flag_error(e: ValueError, flags: dict[str, str], args: argparse.Namespace) -> ValueError:
    """The config's own error, led by the flag (and value) that set the field it names."""
    field = getattr(e, "field", None)
    if field not in flags:
        return e
    flag = flags[field]
    return ValueError(f"{flag} {getattr(args, flag[2:].replace('-', '_'), '')}: {e}")


def probe_config(args: argparse.Namespace):
    """``ProbeConfig`` from ``layerfx probe``'s flags, checked by the class itself (imports neither NeMo nor
    torch)."""
    from nemo_layerfx.importance.config import ProbeConfig

    modes = ("reinit", "rerand") if args.mode == "both" else (args.mode,)
    try:
        return ProbeConfig(modes=modes, unit=args.unit, draws=args.draws, seed=args.seed, batch_size=args.batch_size,
                           max_utterances=args.max_utterances, rule=args.rule, ambient_rel_threshold=args.threshold,
                           n_ambient=args.n_ambient, batch_variants=args.batch_variants, bootstrap=args.bootstrap,
                           ci_level=args.ci_level)
    except ValueError as e:
        raise _flag_error(e, PROBE_FLAGS, args) from None


def lowrank_config(args: argparse.Namespace):
    """``LowRankConfig`` from ``layerfx lowrank``'s flags (skipping factorizations that save nothing), each spec
    read and checked by the config module itself."""
    from nemo_layerfx.lowrank.config import GROUPS, LowRankConfig, check_spec, parse_spec

    specs = {}
    for group in GROUPS:
        text = getattr(args, group)
        try:
            specs[group] = check_spec(group, parse_spec(text))
        except ValueError as e:
            raise ValueError(f"--{group} {text}: {e}") from None
    try:
        return LowRankConfig(**specs, multiple_of=args.multiple_of, only_if_smaller=True)
    except ValueError as e:
        raise _flag_error(e, {"multiple_of": "--multiple-of"}, args) from None


def _federated_configs() -> list[str]:
    """Names of the shipped federated configs (conf/federated/*.yaml), found without importing the package."""
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("nemo_layerfx").origin).parent / "conf" / "federated"
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _fresh(out: str, name: str, force: bool) -> None:
    """Refuse to overwrite what an earlier run wrote in ``out`` (its ``name``) unless ``--force``."""
    if not force and os.path.exists(os.path.join(out, name)):
        raise ValueError(f"--out {out} already holds {name} from an earlier run; give another --out, or --force "
                         "to overwrite it")


def _at_least(flag: str, value: int | None, low: int = 1) -> None:
    if value is not None and value < low:
        raise ValueError(f"{flag} {value}: must be >= {low}")


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of a command's flags, before anything heavy is imported; errors name the flag."""
    cmd = args.command
    if cmd in ("probe", "depth-sweep", "eval"):
        _at_least("--max-utterances", args.max_utterances)
        _at_least("--batch-size", args.batch_size)
    if cmd == "eval" and not 0.0 < args.ci_level < 1.0:
        raise ValueError(f"--ci-level {args.ci_level}: must be in (0, 1)")
    if cmd == "eval":
        _need_file(args.model, "model")
        _need_file(args.manifest, "--manifest")
        _at_least("--bootstrap", args.bootstrap, 0)
    if cmd == "probe":
        _need_file(args.model, "model")
        _need_file(args.manifest, "--manifest")
        if args.mode in ("reinit", "both") and args.init is None:
            raise ValueError(f"--mode {args.mode} needs --init INIT.safetensors (the step-0 snapshot saved at fit "
                             f"start); a pretrained .nemo does not carry its initial weights, so use --mode rerand")
        if args.init is not None:
            _need_file(args.init, "--init")
        probe_config(args)
    elif cmd == "extract":
        _need_file(args.model, "model")
        _distinct(args.model, args.output)
        from nemo_layerfx.fd.plan import check_rate  # DropoutPlan's own rule

        for flag, rate in (("--rate", args.rate), ("--base-rate", args.base_rate)):
            check_rate(rate, flag)
        if args.report is not None:
            _need_file(args.report, "--report")
            if args.n < 1:
                raise ValueError(f"--n {args.n}: must be >= 1")
    elif cmd == "depth-sweep":
        _need_file(args.model, "model")
        _need_file(args.manifest, "--manifest")
        if args.probe is not None:
            _need_file(args.probe, "--probe")
    elif cmd == "set-depth" and args.depth < 0:
        raise ValueError(f"--depth {args.depth}: an inference depth is 1..n_layers (0: all layers)")
    if cmd in ("convert-norm", "lowrank", "merge", "unshare", "set-depth", "prune"):
        _need_file(args.input, "input")
        _distinct(args.input, args.output)
        if cmd == "convert-norm":
            _at_least("--groups", args.groups)
        if cmd == "lowrank":
            if args.att is None and args.ffn is None and args.conv is None:
                raise ValueError("give at least one of --att, --ffn, --conv (e.g. --att 0.1,0.2 --ffn 0.2,0.5)")
            lowrank_config(args)
    elif cmd == "fl":
        name = args.config_name
        if name.endswith((".yaml", ".yml")):
            _need_file(name, "--config-name")
        elif name not in _federated_configs():
            raise ValueError(f"--config-name {name}: no such federated config; shipped: "
                             f"{', '.join(_federated_configs())} (or give the path of your own .yaml)")
    elif cmd == "compare":
        for path in args.reports:
            _need_file(path, "report")
    elif cmd == "make-corpus":
        _at_least("--n", args.n)
        if not 1 <= args.speakers <= 152:
            raise ValueError(f"--speakers {args.speakers}: speakers must be between 1 and 152")
        _at_least("--workers", args.workers)
        for flag, frac in (("--dev-frac", args.dev_frac), ("--test-frac", args.test_frac)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{flag} {frac}: a fraction of the sentences, in [0, 1)")
        if args.dev_frac + args.test_frac >= 1.0:
            raise ValueError(f"--dev-frac {args.dev_frac} + --test-frac {args.test_frac} leave no training sentences")
        _at_least("--vocab", args.vocab, 0)
        _at_least("--vocab-size", args.vocab_size, -1)
    if cmd in ("probe", "depth-sweep"):  # last: every other mistake is named first
        _fresh(args.out, "probe.json" if cmd == "probe" else "depth_sweep.json", args.force)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"layerfx {args.command}: error: {e}", file=sys.stderr)
        return 2
    from nemo_layerfx.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
