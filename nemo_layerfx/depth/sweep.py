"""Every inference depth 1..N in one pass over the data (Tian et al.'s Table 2), and layer consistency (Fig. 3).

Per batch the front end runs once and each layer once; the output of layer M-1 is decoded as the model cut to M
layers (the probe's prefix cache, ``nemo_layerfx.evaluate``). From the same pass: WER, the model's loss and the
real-time factor per depth (front end + layers 0..M-1 + decoding at depth M, over the audio's duration), and per
pair of consecutive layers the mean L2 distance and cosine similarity of their outputs on valid frames. Works on
any Conformer model (ours or NeMo's stock encoder, shared or not); the truncation curve is a cheap importance
measure of its own, printed beside a probe report when one is given.

Shape notation: B batch, T frames after subsampling, D d_model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nemo_layerfx.evaluate import (
    audio_batches, batch_loss, decode, next_layer, output_from, prefix_start, read_manifest, wer,
)
from nemo_layerfx.models import block_layers, conformer_encoder, eval_depth, read_report


@dataclass
class DepthReport:
    """Per inference depth M = 1..N (index M-1): WER, loss, real-time factor; per consecutive layer pair
    (l-1, l), l = 1..N-1: mean L2 distance and cosine similarity of the layer outputs on valid frames."""

    depths: list[int]
    wer: list[float]
    loss: list[float]
    rtf: list[float]
    l2: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    utterances: int = 0
    audio_seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def table(self, probe: Any = None, mode: str = "rerand") -> str:
        """Per depth M: WER, its change from the full depth, loss, RTF, and the consistency of layers M-1 and M
        (the pair ending at the layer M adds); with a block probe report, its WER change for layer M-1 beside."""
        n = len(self.depths)
        own = self.config.get("inference_depth") or n  # the depth the model runs; the WER change is against it
        head = (f"{'depth':>5} {'WER':>8} {f'dWER vs {own}':>10} {'loss':>9} {'RTF':>8} {'L2 to prev':>11} "
                f"{'cosine':>7}")
        probe_delta = None
        if probe is not None:
            probe_delta = probe_layer_deltas(probe, n, mode)
            head += f"  {'probe dWER ' + mode:>18} (layer M-1)"
        total = self.config.get("n_layers") or n
        held = (f"the model runs {own} of its {total} layers (inference depth {own}); depths 1..{n} swept"
                + ("" if n == total else " (--all-layers sweeps all)")) if own != total else f"{n} layers"
        lines = [f"{self.utterances} utterances, {self.audio_seconds:.0f} s of audio; {held}", head]
        for k, m in enumerate(self.depths):
            pair = k - 1  # the pair (m-2, m-1): consistency of the last two layers this depth runs
            l2 = f"{self.l2[pair]:11.3f}" if pair >= 0 else f"{'':11}"
            cos = f"{self.cosine[pair]:7.3f}" if pair >= 0 else f"{'':7}"
            row = (f"{m:5d} {self.wer[k]:8.4f} {self.wer[k] - self.wer[own - 1]:+10.4f} {self.loss[k]:9.3f} "
                   f"{self.rtf[k]:8.4f} {l2} {cos}")
            if probe_delta is not None and k < len(probe_delta):
                row += f"  {probe_delta[k]:+18.4f}"
            lines.append(row)
        return "\n".join(lines)


@torch.no_grad()
def depth_sweep(model: nn.Module, manifest: str | Path, batch_size: int = 16, max_utterances: int | None = None,
                progress: Callable[[int], None] | None = None, all_layers: bool = False) -> DepthReport:
    """Evaluate ``model`` cut to every depth 1..M in one pass over ``manifest`` (eval mode; weights untouched).

    M is the depth the model runs at inference: all N layers, or its inference depth (``set-depth``, Tian's SLI),
    so that depth M is the model as ``transcribe()`` runs it. ``all_layers`` sweeps all N layers the model holds
    (an SLI model keeps the weights of the layers it skips).

    Example::

        report = depth_sweep(model, "dev_manifest.json")
        print(report.table())
    """
    enc = conformer_encoder(model)
    own = eval_depth(enc)
    n = len(enc.layers) if all_layers else own
    rows = read_manifest(manifest, max_utterances)
    device = next(model.parameters()).device
    errors = [[] for _ in range(n)]
    loss_sum, refs = [0.0] * n, []
    seconds = {"front": 0.0, "layers": [0.0] * n, "decode": [0.0] * n}
    l2_sum, cos_sum, frames = [0.0] * (n - 1), [0.0] * (n - 1), 0
    was = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for b, (audio, lengths, texts) in enumerate(audio_batches(rows, batch_size, model._cfg.sample_rate, device)):
            refs += texts
            sync()
            t0 = time.perf_counter()
            p = prefix_start(model, audio, lengths)
            sync()
            seconds["front"] += time.perf_counter() - t0
            valid = ~p.pad_mask  # (B, T)
            frames += int(valid.sum())
            for i in range(n):
                t0 = time.perf_counter()
                next_layer(enc, p)
                sync()
                seconds["layers"][i] += time.perf_counter() - t0
                t0 = time.perf_counter()
                out = output_from(enc, p.hidden[i + 1])
                errors[i] += decode(model, out, p.length)
                sync()
                seconds["decode"][i] += time.perf_counter() - t0
                loss_sum[i] += batch_loss(model, out, p.length, texts) * len(texts)
                if i >= 1:  # consistency of the outputs of layers i-1 and i, on valid frames
                    a, c = p.hidden[i][valid], p.hidden[i + 1][valid]  # (frames, D)
                    l2_sum[i - 1] += float((c - a).norm(dim=1).sum())
                    cos_sum[i - 1] += float(torch.nn.functional.cosine_similarity(c, a, dim=1).sum())
            if progress is not None:
                progress(b)
    finally:
        model.train(was)
    audio_s = sum(r["duration"] for r in rows)
    rtf = []
    for i in range(n):
        rtf.append((seconds["front"] + sum(seconds["layers"][: i + 1]) + seconds["decode"][i]) / audio_s)
    return DepthReport(depths=list(range(1, n + 1)), wer=[wer(h, refs) for h in errors],
                       loss=[s / len(refs) for s in loss_sum], rtf=rtf, l2=[s / frames for s in l2_sum],
                       cosine=[s / frames for s in cos_sum], utterances=len(refs), audio_seconds=audio_s,
                       config={"batch_size": batch_size, "max_utterances": max_utterances, "device": str(device),
                               "share_layers": getattr(enc, "share_layers", None), "n_layers": len(enc.layers),
                               "inference_depth": own})


def probe_layer_deltas(probe: Any, n_layers: int, mode: str = "rerand") -> list[float]:
    """A block probe report's WER change per layer, layer 0 first: what the sweep shows beside depth M (layer M-1).

    Checked, since a list of numbers misread is a wrong table, not an error: the units must be the blocks
    ``layers.0``, ``layers.1``, ... (all of the model's layers, or the first ones, as ``ProbeConfig.depth`` probes);
    a module report (``layers.0.ffn1``, ...) rates parts of a layer, not what cutting at a depth removes."""
    r = read_report(probe)
    units = list(r.get("units", []))
    layers = block_layers(r, "the depth sweep (a whole layer's WER change beside the depth that adds it)")
    if layers != list(range(len(layers))) or len(layers) > n_layers:
        raise ValueError(f"the probe report's units {units[:4]}{'...' if len(units) > 4 else ''} are not the blocks "
                         f"layers.0, layers.1, ... of this {n_layers}-layer model: probe this model "
                         "(layerfx probe MODEL --manifest dev.json)")
    delta = r.get("delta_wer", {}).get(mode)
    if delta is None or len(delta) != len(units):
        raise ValueError(f"the probe report has no {mode!r} results (it has: {sorted(r.get('delta_wer', {}))}); "
                         "show the mode it was run with (layerfx depth-sweep --probe-mode)")
    return list(delta)


def plot_sweep(report: DepthReport, path: str | Path, probe: Any = None, mode: str = "rerand") -> None:
    """PNG: WER and RTF per inference depth; consistency (L2, cosine) per layer pair; the probe beside if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.3))
    a.plot(report.depths, report.wer, marker="o", label="WER at depth M")
    if probe is not None:
        delta = probe_layer_deltas(probe, len(report.depths), mode)
        base = report.wer[(report.config.get("inference_depth") or len(report.depths)) - 1]  # the probe's baseline
        a.plot(report.depths[: len(delta)], [base + d for d in delta], marker="s", ls="--",
               label=f"probe: WER after {mode} of layer M-1")
    a.set_xlabel("inference depth M")
    a.set_ylabel("WER")
    a2 = a.twinx()
    a2.plot(report.depths, report.rtf, color="gray", ls=":", label="RTF")
    a2.set_ylabel("real-time factor")
    a.legend(fontsize=7, loc="upper right")
    pairs = list(range(2, len(report.depths) + 1))
    b.plot(pairs, report.l2, marker="o", label="L2 distance")
    b.set_xlabel("layer pair (M-1, M)")
    b.set_ylabel("mean L2 distance")
    b2 = b.twinx()
    b2.plot(pairs, report.cosine, marker="s", color="tab:orange", label="cosine similarity")
    b2.set_ylabel("cosine similarity")
    b.set_title("layer consistency (valid frames)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
