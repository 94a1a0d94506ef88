"""Layer importance of a Conformer: reset one layer at a time and measure the WER change (Zhou et al. 2021).

* re-init: the layer goes back to its step-0 values (needs an init snapshot, saved at fit start)
* re-rand: the layer gets a fresh draw from its own initializers (seeded; ``draws`` draws averaged)

Layers whose reset costs (almost) nothing are *ambient*, the others *critical*. The probe never recomputes
unchanged work: per batch, the preprocessor, subsampling and the hidden state entering every layer are computed
once with the trained weights, and a reset of layer i runs only layers i..N-1 and the decoder.

Shape notation: B batch, T frames after subsampling, D d_model.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

MODES = ("reinit", "rerand")
UNITS = ("block", "module")
# unit=module: each Conformer sub-module together with its pre-norm, in NeMo's attribute names
MODULE_PARTS = {
    "ffn1": ("norm_feed_forward1", "feed_forward1"),
    "attn": ("norm_self_att", "self_attn"),
    "conv": ("norm_conv", "conv"),
    "ffn2": ("norm_feed_forward2", "feed_forward2"),
}


def conformer_encoder(model: nn.Module) -> nn.Module:
    """The model's Conformer encoder (ours or NeMo's), or a clear error."""
    from nemo.collections.asr.modules.conformer_encoder import ConformerEncoder

    enc = getattr(model, "encoder", None)
    if not isinstance(enc, ConformerEncoder):
        raise ValueError(f"model has no Conformer encoder (encoder is {type(enc).__name__}); the probe needs a "
                         f"NeMo ConformerEncoder or nemo_layerfx GroupNormConformerEncoder")
    if getattr(enc, "reduction_position", None) is not None:
        raise ValueError("Conformer encoders with reduction_subsampling are not supported by the probe")
    return enc


# --- init snapshots -----------------------------------------------------------------------------------------
def _layer_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every encoder layer tensor (parameters and buffers) under its snapshot key ``layers.{i}.{name}``."""
    for i, layer in enumerate(conformer_encoder(model).layers):
        for k, v in layer.state_dict().items():
            yield f"layers.{i}.{k}", v


def layer_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every encoder layer tensor, keyed ``layers.{i}.{name}``."""
    return {k: v.detach().cpu().clone() for k, v in _layer_tensors(model)}


def save_snapshot(snapshot: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors file (no pickle); written to a temporary name first, so a crash never leaves half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in snapshot.items()}, str(tmp))
    tmp.replace(path)


def load_snapshot(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such init snapshot: {path}")
    return load_file(str(path))


def check_snapshot(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """The snapshot must hold exactly this encoder's layer tensors with the same shapes."""
    expected = {k: v.shape for k, v in _layer_tensors(model)}  # shapes only: no copy of the weights
    missing = sorted(set(expected) - set(snapshot))
    extra = sorted(set(snapshot) - set(expected))
    wrong = sorted(k for k in set(expected) & set(snapshot) if tuple(snapshot[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        detail = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                  "shape mismatch " + ", ".join(f"{k}: {tuple(snapshot[k].shape)} vs model {tuple(expected[k])}"
                                                for k in wrong[:3]) if wrong else ""]
        raise ValueError("init snapshot does not match the model: " + "; ".join(d for d in detail if d))


# --- resets ---------------------------------------------------------------------------------------------------
def fresh_draw(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A new state for ``module`` from its own initializers, drawn on CPU under ``seed``.

    The global RNG streams are untouched (the draw uses a forked CPU generator), so probing mid-training does
    not change what training samples next.
    """
    fresh = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            for name in ("pos_bias_u", "pos_bias_v"):  # NeMo initializes these to zero
                if isinstance(getattr(m, name, None), nn.Parameter):
                    nn.init.zeros_(getattr(m, name))
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


@contextmanager
def swapped(module: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load ``state`` into ``module``; the original values come back exactly, also on error."""
    own = module.state_dict()
    saved = {k: v.detach().clone() for k, v in own.items()}
    try:
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)


# --- data and decoding ------------------------------------------------------------------------------------------
def read_manifest(path: str | Path, max_utterances: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such manifest: {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"manifest is empty: {path}")
    for r in rows:
        audio = Path(r["audio_filepath"])
        r["audio_filepath"] = str(audio if audio.is_absolute() else path.parent / audio)
    rows.sort(key=lambda r: r["duration"])  # less padding; a fixed order makes probes comparable
    return rows[:max_utterances] if max_utterances else rows


def audio_batches(rows: list[dict], batch_size: int, sample_rate: int, device) -> Iterator[tuple]:
    import soundfile as sf

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        waves = []
        for r in chunk:
            wav, sr = sf.read(r["audio_filepath"], dtype="float32")
            if sr != sample_rate:
                raise ValueError(f"{r['audio_filepath']} is {sr} Hz; the model expects {sample_rate} Hz")
            waves.append(torch.from_numpy(wav if wav.ndim == 1 else wav.mean(axis=1)))
        lengths = torch.tensor([len(w) for w in waves])
        audio = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            audio[i, : len(w)] = w
        yield audio.to(device), lengths.to(device), [r["text"] for r in chunk]


@dataclass
class _Prefix:
    hidden: list[torch.Tensor]  # hidden[i]: (B, T, D) input of layer i; hidden[N]: encoder output before out_proj
    length: torch.Tensor  # (B,) encoded lengths
    pos_emb: torch.Tensor
    pad_mask: torch.Tensor
    att_mask: torch.Tensor | None


@torch.no_grad()
def encode_prefix(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor) -> _Prefix:
    """Preprocessor, subsampling and every layer once; keeps the hidden state entering each layer."""
    enc = conformer_encoder(model)
    feats, feat_len = model.preprocessor(input_signal=audio, length=lengths)
    x = feats.transpose(1, 2)  # (B, T_feat, F)
    if isinstance(enc.pre_encode, nn.Linear):
        x, length = enc.pre_encode(x), feat_len
    else:
        x, length = enc.pre_encode(x=x, lengths=feat_len)
    length = length.to(torch.int64)
    x, pos_emb = enc.pos_enc(x=x, cache_len=0)
    pad_mask, att_mask = enc._create_masks(att_context_size=enc.att_context_size, padding_length=length,
                                           max_audio_length=x.size(1), offset=None, device=x.device)
    prefix = _Prefix([x], length, pos_emb, pad_mask, att_mask)
    run_layers(enc, prefix, 0, keep=True)
    return prefix


def run_layers(enc: nn.Module, p: _Prefix, start: int, keep: bool = False) -> torch.Tensor:
    """Layers ``start``..N-1 on ``p.hidden[start]``; returns the encoder output (B, D, T)."""
    x = p.hidden[start]
    for layer in enc.layers[start:]:
        x = layer(x=x, att_mask=p.att_mask, pos_emb=p.pos_emb, pad_mask=p.pad_mask)
        if keep:
            p.hidden.append(x)
    if enc.out_proj is not None:
        x = enc.out_proj(x)
    return x.transpose(1, 2)


@torch.no_grad()
def run_variants(enc: nn.Module, p: _Prefix, layer_idx: int,
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
    for layer in enc.layers[layer_idx + 1:]:
        x = layer(x=x, att_mask=att_mask, pos_emb=p.pos_emb, pad_mask=pad_mask)
    if enc.out_proj is not None:
        x = enc.out_proj(x)
    return list(x.transpose(1, 2).chunk(v))


@torch.no_grad()
def decode(model: nn.Module, encoded: torch.Tensor, length: torch.Tensor) -> list[str]:
    """Greedy transcripts from encoder output (B, D, T): RNNT (and hybrid) through the joint, else CTC."""
    if hasattr(model, "joint"):
        hyps = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=encoded, encoded_lengths=length)
    else:
        log_probs = model.decoder(encoder_output=encoded)
        hyps = model.decoding.ctc_decoder_predictions_tensor(log_probs, decoder_lengths=length)
    if isinstance(hyps, tuple):
        hyps = hyps[0]
    return [h.text if hasattr(h, "text") else str(h) for h in hyps]


def _token_ids(model: nn.Module, text: str) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return list(tokenizer.text_to_ids(text))
    vocab = {c: i for i, c in enumerate(model.decoder.vocabulary)}  # char models
    return [vocab[c] for c in text.lower() if c in vocab]


@torch.no_grad()
def batch_loss(model: nn.Module, encoded: torch.Tensor, length: torch.Tensor, texts: list[str]) -> float:
    """The model's own training loss (CTC, or RNNT through the joint) on one batch, as NeMo reduces it."""
    ids = [_token_ids(model, t) for t in texts]
    tl = torch.tensor([len(i) for i in ids], device=encoded.device)
    targets = torch.zeros(len(ids), max(1, int(tl.max())), dtype=torch.long, device=encoded.device)
    for i, seq in enumerate(ids):
        targets[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    if not hasattr(model, "joint"):
        log_probs = model.decoder(encoder_output=encoded)
        return float(model.loss(log_probs=log_probs, targets=targets, input_lengths=length, target_lengths=tl))
    dec, _, _ = model.decoder(targets=targets, target_length=tl)
    if model.joint.fuse_loss_wer:
        return float(model.joint(encoder_outputs=encoded, decoder_outputs=dec, encoder_lengths=length,
                                 transcripts=targets, transcript_lengths=tl, compute_wer=False)[0])
    joint = model.joint(encoder_outputs=encoded, decoder_outputs=dec)
    return float(model.loss(log_probs=joint, targets=targets, input_lengths=length, target_lengths=tl))


def wer(hyps: list[str], refs: list[str]) -> float:
    from nemo.collections.asr.metrics.wer import word_error_rate

    return float(word_error_rate(hypotheses=hyps, references=refs))


# --- the probe -----------------------------------------------------------------------------------------------------
@dataclass
class ProbeConfig:
    """What to reset and how to label layers."""

    modes: tuple[str, ...] = ("rerand",)  # reinit (needs an init snapshot) and/or rerand
    unit: str = "block"  # block: a whole Conformer layer; module: ffn1 / attn / conv / ffn2 with its pre-norm
    draws: int = 1  # re-rand draws averaged per unit
    seed: int = 0  # re-rand draw d of unit u uses the seed seed * 1000003 + u * 1009 + d
    ambient_rel_threshold: float = 0.10  # ambient if WER <= baseline * (1 + threshold) (Zhou gives no number)
    n_ambient: int | None = None  # instead: the n units with the smallest WER change are ambient
    batch_size: int = 16
    max_utterances: int | None = None  # probe on the first N utterances (manifest sorted by duration)
    loss: bool = True  # also the model's loss per reset (one more decoder/joint pass per batch and reset)
    batch_variants: int = 1  # reset variants of one layer run through layers i+1.. as one batch (GPU: try 8)

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown probe mode(s) {bad or '(none)'}; choose from {', '.join(MODES)}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.ambient_rel_threshold < 0:
            raise ValueError("ambient_rel_threshold must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.batch_variants < 1:
            raise ValueError(f"batch_variants must be >= 1, got {self.batch_variants}")


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
    churn: dict[str, list[float]] | None = None  # per-layer ||W_t - W_0||_F / max over layers, per module kind
    churn_rank_correlation: dict[str, float] | None = None  # mode -> Spearman(churn of each unit, its WER change)
    config: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def table(self) -> str:
        modes = list(self.delta_wer)
        head = f"{'unit':<18}" + "".join(f"{'dWER ' + m:>14}" for m in modes) + f"{'label':>10}"
        loss = f", loss {self.baseline_loss:.3f}" if self.baseline_loss is not None else ""
        lines = [f"baseline WER {self.baseline_wer:.4f}{loss} on {self.utterances} utterances", head]
        first = modes[0]
        for i, u in enumerate(self.units):
            label = "ambient" if u in self.ambient[first] else "critical"
            lines.append(f"{u:<18}" + "".join(f"{self.delta_wer[m][i]:>+14.4f}" for m in modes) + f"{label:>10}")
        if self.churn_rank_correlation:
            lines.append("rank correlation of weight churn and WER change: " + ", ".join(
                f"{m} {r:+.3f}" for m, r in self.churn_rank_correlation.items()))
        return "\n".join(lines)


def probe_units(model: nn.Module, unit: str) -> list[tuple[str, int, nn.Module]]:
    """(name, layer index, module to reset) for every probe unit of the encoder."""
    enc = conformer_encoder(model)
    if unit == "block":
        return [(f"layers.{i}", i, layer) for i, layer in enumerate(enc.layers)]
    units = []
    for i, layer in enumerate(enc.layers):
        for part, names in MODULE_PARTS.items():
            units.append((f"layers.{i}.{part}", i, nn.ModuleDict({n: getattr(layer, n) for n in names})))
    return units


def init_state(module: nn.Module, layer_idx: int, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step-0 values of ``module`` (a layer or part of layer ``layer_idx``) from a layer snapshot."""
    return {k: snapshot[f"layers.{layer_idx}.{k}"] for k in module.state_dict()}


def churn(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Zhou's weight-update metric per layer: ||W_t - W_0||_F over each module kind, divided by its max over layers."""
    enc = conformer_encoder(model)
    raw: dict[str, list[float]] = {k: [] for k in ("block", *MODULE_PARTS)}
    for i, layer in enumerate(enc.layers):
        sq = {k: 0.0 for k in raw}
        for name, value in layer.state_dict().items():
            if not value.is_floating_point():
                continue
            d = float((value.detach().cpu() - snapshot[f"layers.{i}.{name}"]).pow(2).sum())
            sq["block"] += d
            for part, names in MODULE_PARTS.items():
                if name.split(".")[0] in names:
                    sq[part] += d
        for k in raw:
            raw[k].append(math.sqrt(sq[k]))
    return {k: [v / max(vals) if max(vals) > 0 else 0.0 for v in vals] for k, vals in raw.items()}


def probe(model: nn.Module, manifest: str | Path, config: ProbeConfig | None = None,
          init: dict[str, torch.Tensor] | str | Path | None = None,
          progress: Callable[[str], None] | None = None) -> ProbeReport:
    """Reset each encoder unit in turn, measure WER, restore it exactly; return the per-unit report.

    Works in place on ``model`` (CTC, RNNT or hybrid; any device) and leaves every weight as it found it, also
    when interrupted. ``init``: the step-0 snapshot (dict or safetensors path), required for ``reinit``.

    Example::

        report = probe(model, "dev_manifest.json", ProbeConfig(modes=("reinit", "rerand"), draws=3),
                       init="runs/init_layers.safetensors")
        print(report.table())
    """
    cfg = config or ProbeConfig()
    enc = conformer_encoder(model)
    if isinstance(init, (str, Path)):
        init = load_snapshot(init)
    if "reinit" in cfg.modes and init is None:
        raise ValueError("mode 'reinit' needs the step-0 init snapshot (init=...); without it only 'rerand' is "
                         "possible (a pretrained .nemo does not carry its initial weights)")
    if init is not None:
        check_snapshot(model, init)
    rows = read_manifest(manifest, cfg.max_utterances)
    device = next(model.parameters()).device
    units = probe_units(model, cfg.unit)
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
            prefix = encode_prefix(model, audio, lengths)
            with torch.no_grad():
                out = run_layers(enc, prefix, len(enc.layers))
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
    base = wer(base_hyps, refs)
    report = ProbeReport(baseline_wer=base, utterances=len(refs), units=[n for n, _, _ in units],
                         config=asdict(cfg))
    if cfg.loss:
        report.baseline_loss = base_loss / len(refs)
    for mode in cfg.modes:
        if cfg.loss:
            report.loss[mode] = [sum(per_draw) / len(per_draw) / len(refs) for per_draw in losses[mode]]
        report.wer[mode] = [sum(wer(h, refs) for h in per_draw) / len(per_draw) for per_draw in hyps[mode]]
        report.delta_wer[mode] = [w - base for w in report.wer[mode]]
        report.ambient[mode] = ambient_units(report.units, report.delta_wer[mode], base, cfg)
    if init is not None:
        report.churn = churn(model, init)
        unit_churn = [report.churn["block" if cfg.unit == "block" else u.rsplit(".", 1)[1]][int(u.split(".")[1])]
                      for u in report.units]
        report.churn_rank_correlation = {m: spearman(unit_churn, d) for m, d in report.delta_wer.items()}
    return report


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"rank correlation needs two equally long lists of >= 2 values, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def compare_reports(reports: list[dict], mode: str = "rerand", top_n: int = 2) -> dict:
    """Agreement of layer rankings across probe reports (runs, seeds, model sizes): Zhou's stability study.

    Pairwise Spearman correlation of the per-unit WER changes (reports over the same units) and the overlap of
    the ``top_n`` most ambient units (relative depth is used when unit counts differ).
    """
    if len(reports) < 2:
        raise ValueError("compare needs at least two probe reports")
    for i, r in enumerate(reports):
        if mode not in r.get("delta_wer", {}):
            raise ValueError(f"report {i} has no {mode!r} results (it has {sorted(r.get('delta_wer', {}))})")
    pairs = []
    for i in range(len(reports)):
        for j in range(i + 1, len(reports)):
            a, b = reports[i], reports[j]
            da, db = a["delta_wer"][mode], b["delta_wer"][mode]
            amb_a = sorted(range(len(da)), key=lambda k: (da[k], k))[:top_n]
            amb_b = sorted(range(len(db)), key=lambda k: (db[k], k))[:top_n]
            same_units = a["units"] == b["units"]
            if same_units:
                overlap = len(set(amb_a) & set(amb_b)) / top_n
                rho = spearman(da, db)
            else:  # different depths: compare relative positions (layer index / layer count)
                rel = lambda idx, n: round(idx / max(n - 1, 1) * 4)  # noqa: E731  (quintiles of depth)
                overlap = len({rel(k, len(da)) for k in amb_a} & {rel(k, len(db)) for k in amb_b}) / top_n
                rho = float("nan")
            pairs.append({"a": i, "b": j, "same_units": same_units, "spearman": rho,
                          f"top{top_n}_ambient_overlap": overlap,
                          "ambient_a": [a["units"][k] for k in amb_a], "ambient_b": [b["units"][k] for k in amb_b]})
    rhos = [p["spearman"] for p in pairs if not math.isnan(p["spearman"])]
    return {"mode": mode, "top_n": top_n, "pairs": pairs,
            "mean_spearman": sum(rhos) / len(rhos) if rhos else float("nan"),
            "mean_overlap": sum(p[f"top{top_n}_ambient_overlap"] for p in pairs) / len(pairs)}


def ambient_units(units: list[str], delta: list[float], base: float, cfg: ProbeConfig) -> list[str]:
    """Ambient by the n smallest WER changes, or by a WER within (1 + threshold) x baseline."""
    if cfg.n_ambient is not None:
        order = sorted(range(len(units)), key=lambda i: (delta[i], i))
        return [units[i] for i in sorted(order[: cfg.n_ambient])]
    return [u for u, d in zip(units, delta) if d <= base * cfg.ambient_rel_threshold + 1e-12]


def plot_report(report: ProbeReport, path: str | Path) -> None:
    """PNG: WER change per unit and reset mode (heatmap), with the weight churn beside it when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report.delta_wer)
    data = torch.tensor([report.delta_wer[m] for m in modes]).T.numpy()  # (units, modes)
    ncols = 2 if report.churn else 1
    fig, axes = plt.subplots(1, ncols, figsize=(3 + 2.2 * ncols, 1.2 + 0.32 * len(report.units)), squeeze=False)
    ax = axes[0][0]
    im = ax.imshow(data, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_yticks(range(len(report.units)), report.units)
    for (i, j), v in __import__("numpy").ndenumerate(data):
        ax.text(j, i, f"{v:+.3f}", ha="center", va="center", fontsize=7,
                color="white" if v > data.max() * 0.6 else "black")
    ax.set_title(f"WER change (baseline {report.baseline_wer:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    if report.churn:
        ax2 = axes[0][1]
        layers = range(len(report.churn["block"]))
        for kind in ("attn", "conv", "ffn1", "ffn2"):
            ax2.plot(report.churn[kind], list(layers), marker="o", label=kind)
        ax2.invert_yaxis()
        ax2.set_xlabel("||W_t - W_0|| / max over layers")
        ax2.set_yticks(list(layers), [f"layers.{i}" for i in layers])
        ax2.legend(fontsize=7)
        ax2.set_title("weight churn", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
