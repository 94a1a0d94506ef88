"""Layer importance of a Conformer: reset one layer at a time and measure the WER change (Zhou et al. 2021).

* re-init: the layer goes back to its step-0 values (needs an init snapshot, saved at fit start)
* re-rand: the layer gets a fresh draw from its own initializers (seeded; ``draws`` draws averaged)

Layers whose reset costs (almost) nothing are *ambient*, the others *critical*. The probe never recomputes
unchanged work: per batch, the preprocessor, subsampling and the hidden state entering every layer are computed
once with the trained weights (``nemo_layerfx.evaluate.encode_prefix``), and a reset of layer i runs only layers
i..N-1 and the decoder.

Shape notation: B batch, T frames after subsampling, D d_model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from nemo_layerfx.evaluate import (
    Prefix, audio_batches, batch_loss, decode, encode_prefix, error_counts, output_from, read_manifest, resamples, wer,
)
from nemo_layerfx.importance.compare import spearman
from nemo_layerfx.importance.config import ProbeConfig
from nemo_layerfx.importance.stats import delta_interval, draw_spread
from nemo_layerfx.importance.resets import (
    check_snapshot, churn, fresh_draw, init_state, load_snapshot, probe_units, probed_encoder, swapped,
)
from nemo_layerfx.distributed import gather_objects, interleave, shard, world
from nemo_layerfx.models import eval_depth



@torch.no_grad()
def run_variants(enc: nn.Module, p: Prefix, layer_idx: int,
                 resets: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> list[torch.Tensor]:
    """Encoder outputs (B, D, T) with layer ``layer_idx`` under each reset, the rest of the encoder shared.

    Each reset runs layer ``layer_idx`` on the cached input; the outputs are stacked along the batch so that the
    layers after it run once for all of them: V resets cost one pass of a V-times larger batch, which keeps a GPU
    busy where V small passes would be bound by kernel launches.
    """
    xs = []
    for module, state in resets:
        with swapped(module, state):
            xs.append(enc.layers[layer_idx](x=p.hidden[layer_idx], att_mask=p.att_mask, pos_emb=p.pos_emb,
                                            pad_mask=p.pad_mask))
    v = len(xs)
    x = torch.cat(xs) if v > 1 else xs[0]
    pad_mask = p.pad_mask.repeat(v, 1) if v > 1 else p.pad_mask
    att_mask = p.att_mask.repeat(v, 1, 1) if v > 1 and p.att_mask is not None else p.att_mask
    for layer in list(enc.layers)[layer_idx + 1:len(p.hidden) - 1]:
        x = layer(x=x, att_mask=att_mask, pos_emb=p.pos_emb, pad_mask=pad_mask)
    return list(output_from(enc, x).chunk(v))


@dataclass
class ProbeReport:
    baseline_wer: float
    utterances: int
    units: list[str]  # "layers.3" or "layers.3.attn"
    wer: dict[str, list[float]] = field(default_factory=dict)  # mode -> per-unit WER after the reset
    delta_wer: dict[str, list[float]] = field(default_factory=dict)
    baseline_loss: float | None = None  # mean over utterances of the per-batch loss
    loss: dict[str, list[float]] = field(default_factory=dict)  # mode -> per-unit loss after the reset
    ambient: dict[str, list[str]] = field(default_factory=dict)
    delta_ci: dict[str, list[list[float]]] = field(default_factory=dict)  # mode -> per-unit [lo, hi] (bootstrap)
    delta_draw_sd: dict[str, list[float | None]] = field(default_factory=dict)  # mode -> spread over re-rand draws
    churn: dict[str, list[float]] | None = None  # per-layer ||W_t - W_0||_F / max over layers, per module kind
    churn_rank_correlation: dict[str, float] | None = None  # mode -> Spearman(churn of each unit, its WER change)
    config: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        modes = list(self.delta_wer)
        level = self.config.get("ci_level", 0.95)
        ci = {m: self.delta_ci.get(m) for m in modes}
        head = f"{'unit':<18}" + "".join(f"{'dWER ' + m:>14}" + (f"{f'{level:.0%} CI':>20}" if ci[m] else "")
                                         for m in modes) + f"{'label':>10}"
        loss = f", loss {self.baseline_loss:.3f}" if self.baseline_loss is not None else ""
        rule = {"relative": f"WER <= baseline x {1 + self.config.get('ambient_rel_threshold', 0.1):.2f}",
                "ci": "interval reaches 0", "top_n": f"the {self.config.get('n_ambient')} smallest changes"}
        lines = [f"baseline WER {self.baseline_wer:.4f}{loss} on {self.utterances} utterances; ambient: "
                 f"{rule.get(self.config.get('rule', 'relative'), '?')} ({modes[0]})", head]
        first = modes[0]
        for i, u in enumerate(self.units):
            label = "ambient" if u in self.ambient[first] else "critical"
            cells = ""
            for m in modes:
                cells += f"{self.delta_wer[m][i]:>+14.4f}"
                if ci[m]:
                    lo, hi = ci[m][i]
                    cells += f"{f'[{lo:+.4f}, {hi:+.4f}]':>20}"
            lines.append(f"{u:<18}" + cells + f"{label:>10}")
        if self.churn_rank_correlation:
            lines.append("rank correlation of weight churn and WER change: " + ", ".join(
                f"{m} {r:+.3f}" for m, r in self.churn_rank_correlation.items()))
        return "\n".join(lines)


def probe(model: nn.Module, manifest: str | Path, config: ProbeConfig | None = None,
          init: dict[str, torch.Tensor] | str | Path | None = None,
          progress: Callable[[str], None] | None = None, distributed: bool = False) -> ProbeReport:
    """Reset each encoder unit in turn, measure WER, restore it exactly; return the per-unit report.

    Works in place on ``model`` (CTC, RNNT or hybrid; any device) and leaves every weight as it found it, also
    when interrupted. ``init``: the step-0 snapshot (dict or safetensors path), required for ``reinit``.
    ``distributed``: every rank of the initialized process group (DDP) calls this on the same weights; each probes
    every ``world``-th utterance, the transcripts and losses are gathered in one collective call at the end, and
    every rank returns the report a single process makes (the same transcripts; losses to float rounding).

    Example::

        report = probe(model, "dev_manifest.json", ProbeConfig(modes=("reinit", "rerand"), draws=3),
                       init="runs/init_layers.safetensors")
        print(report.table())
    """
    cfg = config or ProbeConfig()
    enc = probed_encoder(model)
    depth = eval_depth(enc)  # an inference depth M (Tian's SLI) limits the probe to the layers the model runs
    if isinstance(init, (str, Path)):
        init = load_snapshot(init)
    if "reinit" in cfg.modes and init is None:
        raise ValueError("mode 'reinit' needs the step-0 init snapshot (init=...); without it only 'rerand' is "
                         "possible (a pretrained .nemo does not carry its initial weights)")
    if init is not None:
        check_snapshot(model, init)
    rows = read_manifest(manifest, cfg.max_utterances)
    rank, size = world() if distributed else (0, 1)
    n_rows, rows = len(rows), shard(rows, rank, size)
    device = next(model.parameters()).device
    units = probe_units(model, cfg.unit, depth)
    # every reset state is drawn once, before any batch (the same draw for every batch)
    variants: dict[str, list[list[dict]]] = {}
    for mode in cfg.modes:
        if mode == "reinit":
            variants[mode] = [[init_state(m, i, init)] for _, i, m in units]
        else:
            variants[mode] = [[fresh_draw(m, seed=cfg.seed * 1_000_003 + u * 1_009 + d) for d in range(cfg.draws)]
                              for u, (_, _, m) in enumerate(units)]
        variants[mode] = [[{k: v.to(device) for k, v in state.items()} for state in vs] for vs in variants[mode]]
    # every (mode, unit, draw) of one layer shares that layer's cached input: group them for batched passes
    by_layer: dict[int, list[tuple[str, int, int]]] = {}
    for mode in cfg.modes:
        for u, (_, layer_idx, _) in enumerate(units):
            by_layer.setdefault(layer_idx, []).extend((mode, u, d) for d in range(len(variants[mode][u])))
    was_training = model.training
    model.eval()
    refs: list[str] = []
    base_hyps: list[str] = []
    hyps = {mode: [[[] for _ in vs] for vs in variants[mode]] for mode in cfg.modes}
    base_loss = 0.0  # summed as batch loss x batch size, divided by the utterance count at the end
    losses = {mode: [[0.0 for _ in vs] for vs in variants[mode]] for mode in cfg.modes}
    try:
        for b, (audio, lengths, texts) in enumerate(audio_batches(rows, cfg.batch_size, model._cfg.sample_rate,
                                                                   device)):
            refs += texts
            prefix = encode_prefix(model, audio, lengths, depth=depth)
            with torch.no_grad():  # the model as it runs: the output of layer depth-1 (SLI(M): not the last layer)
                out = output_from(enc, prefix.hidden[depth])
                base_hyps += decode(model, out, prefix.length)
                if cfg.loss:
                    base_loss += batch_loss(model, out, prefix.length, texts) * len(texts)
            for layer_idx, jobs in by_layer.items():
                for start in range(0, len(jobs), cfg.batch_variants):
                    group = jobs[start:start + cfg.batch_variants]
                    if progress is not None:
                        progress(f"batch {b} layers.{layer_idx} resets {start}..{start + len(group) - 1}")
                    outs = run_variants(enc, prefix, layer_idx,
                                        [(units[u][2], variants[mode][u][d]) for mode, u, d in group])
                    length = prefix.length.repeat(len(group))
                    texts_all = decode(model, torch.cat(outs) if len(outs) > 1 else outs[0], length)
                    for k, (mode, u, d) in enumerate(group):
                        hyps[mode][u][d] += texts_all[k * len(texts):(k + 1) * len(texts)]
                        if cfg.loss:
                            losses[mode][u][d] += batch_loss(model, outs[k], prefix.length, texts) * len(texts)
    finally:
        model.train(was_training)
    if size > 1:  # one collective call, whatever each shard held
        parts = gather_objects((refs, base_hyps, hyps, base_loss, losses))
        refs, base_hyps = interleave([p[0] for p in parts]), interleave([p[1] for p in parts])
        hyps = {m: [[interleave([p[2][m][u][d] for p in parts]) for d in range(len(vs))]
                    for u, vs in enumerate(variants[m])] for m in cfg.modes}
        base_loss = sum(p[3] for p in parts)
        losses = {m: [[sum(p[4][m][u][d] for p in parts) for d in range(len(vs))] for u, vs in enumerate(variants[m])]
                  for m in cfg.modes}
        if len(refs) != n_rows:
            raise RuntimeError(f"the ranks' shards hold {len(refs)} utterances, the manifest {n_rows}")
    base = wer(base_hyps, refs)
    report = ProbeReport(baseline_wer=base, utterances=len(refs), units=[n for n, _, _ in units],
                         config={**asdict(cfg), "depth": depth, "n_layers": len(enc.layers)})
    if cfg.loss:
        report.baseline_loss = base_loss / len(refs)
    base_err, words = error_counts(base_hyps, refs)
    idx = resamples(len(refs), cfg.bootstrap, cfg.seed) if cfg.bootstrap else None
    for mode in cfg.modes:
        if cfg.loss:
            report.loss[mode] = [sum(per_draw) / len(per_draw) / len(refs) for per_draw in losses[mode]]
        report.wer[mode] = [sum(wer(h, refs) for h in per_draw) / len(per_draw) for per_draw in hyps[mode]]
        report.delta_wer[mode] = [w - base for w in report.wer[mode]]
        errs = [np.stack([error_counts(h, refs)[0] for h in per_draw]) for per_draw in hyps[mode]]  # (draws, n)
        report.delta_draw_sd[mode] = [draw_spread(base_err, words, e) for e in errs]
        if idx is not None:
            report.delta_ci[mode] = [list(delta_interval(base_err, words, e, idx, cfg.ci_level)) for e in errs]
        report.ambient[mode] = ambient_units(report.units, report.delta_wer[mode], base, cfg,
                                             report.delta_ci.get(mode))
    if init is not None:
        report.churn = churn(model, init)
        unit_churn = [report.churn["block" if cfg.unit == "block" else u.rsplit(".", 1)[1]][int(u.split(".")[1])]
                      for u in report.units]
        report.churn_rank_correlation = {m: spearman(unit_churn, d) for m, d in report.delta_wer.items()}
    return report


def ambient_units(units: list[str], delta: list[float], base: float, cfg: ProbeConfig,
                  ci: list[list[float]] | None = None) -> list[str]:
    """The ambient units under ``cfg.rule``: ``relative`` (WER within (1 + threshold) x baseline), ``ci`` (not
    significantly worse than the baseline: the interval's lower end reaches 0), or ``top_n`` (the n smallest)."""
    if cfg.rule == "top_n":
        order = sorted(range(len(units)), key=lambda i: (delta[i], i))
        return [units[i] for i in sorted(order[: cfg.n_ambient])]
    if cfg.rule == "ci":
        return [u for u, (lo, _) in zip(units, ci) if lo <= 1e-12]
    return [u for u, d in zip(units, delta) if d <= base * cfg.ambient_rel_threshold + 1e-12]
