"""Everything a federated-dropout run does that is not Flower: config, data, local training, evaluation, checkpoints.

Imports no ``flwr``, so it is usable and testable without Flower (Flower's quickstart keeps ``task.py`` the same way).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_layerfx.fd import DropoutPlan, FreezeSpec

log = logging.getLogger("nemo_layerfx.fl")


@dataclass
class FLConfig:
    """One federated-dropout run (``conf/federated/*.yaml`` holds these fields; ``layerfx fl`` composes them).

    model: the global model, a Conformer ``.nemo`` with our GroupNorm encoder (clients hold it too: it gives them
        the architecture and tokenizer; each round they receive only their submodel's weights).
    corpus: a ``layerfx make-corpus`` folder; each ``clients/<speaker>.json`` is one client (non-IID by speaker),
        ``dev_manifest.json`` scores the global model after every round.
    plan: how clients are shrunk. ``type``: flat | ambient | critical | explicit; ``rate`` (the dropout rate on the
        targeted layers, or every layer for flat), ``base_rate`` (all other layers), ``n`` (targeted layers),
        ``kinds`` (ffn, head, conv), ``report`` (a block-level probe.json, for ambient / critical), ``rates``
        (explicit: kind -> per-layer rates).
    freeze: partial-variable training (``nemo_layerfx.fd.FreezeSpec``): what clients keep frozen, by parameter-name
        prefix or ``front_end`` (``names``), by layer sub-module (``modules``: ffn1, attn, conv, ffn2, ffn) or by
        a probe report (``blocks``: report, n, target ambient / critical). Only the trained tensors of each
        submodel are sent and returned; clients take the frozen ones from their copy of ``model``. Empty: train
        everything (and send every tensor, as plain federated dropout does).
    micro_batch_size: the most utterances one forward/backward pass may hold *with the full model* (what the
        client devices' memory allows); None: a local step of ``batch_size`` utterances is one pass. When set, a
        local step is taken as accumulated passes, which compute the same gradient (the encoder ignores padding),
        and a client's smaller submodel takes bigger passes: as many utterances (a divisor of ``batch_size``) as
        fit the memory that ``micro_batch_size`` utterances take with the full model, counted exactly on the
        client's longest utterances (``pass_size``). Fewer, bigger passes are what make a small client faster on
        short utterances, where a pass costs about the same number of operator calls whatever the width.
    """

    model: str
    corpus: str
    out: str = "runs/fl"
    rounds: int = 3
    num_clients: int | None = None  # the first n speakers (sorted); None: every client manifest
    local_steps: int = 5  # E local SGD steps per client and round
    batch_size: int = 8
    micro_batch_size: int | None = None  # utterances per pass with the full model (device memory); None: batch_size
    client_lr: float = 0.05  # client SGD (Guliani: SGD on clients, Adam on the server)
    clip_grad: float | None = 1.0  # clients clip the gradient norm (CTC/RNNT losses are sums over frames)
    plan: dict[str, Any] = field(default_factory=lambda: {"type": "flat", "rate": 0.0, "kinds": ["ffn"]})
    freeze: dict[str, Any] = field(default_factory=dict)  # partial-variable training: what clients keep frozen
    mapping: str = "pcpr"  # pcpr: units per client per round; pr: per round
    rule: str = "zero_fill"  # zero_fill (Guliani/FP) or coverage (HeteroFL)
    server_opt: str = "fedavg"  # fedavg or fedadam
    server_lr: float = 1.0
    seed: int = 0
    dev_max_utterances: int | None = None
    accelerator: str = "cpu"  # clients' Lightning accelerator
    client_cpus: int = 1  # simulation: whole CPU cores per client actor (2 clients train at once on 2 cores)
    # another ClientApp for the simulation: "module:function" building it from this config (e.g. the test suite's
    # fault-injecting client, tests/fl_faults.py); "" is ours. ``client_options`` are for it, free-form.
    client_app: str = ""
    client_options: dict[str, Any] = field(default_factory=dict)
    resume: bool = True  # continue from out/checkpoint.pt when it exists

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_steps and batch_size must be >= 1")
        divisors = _divisors(self.batch_size)
        if self.micro_batch_size is not None and self.micro_batch_size not in divisors:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size} "
                             f"(a local step is batch_size utterances in equal passes): one of {divisors}, or "
                             f"null for one pass")
        if isinstance(self.client_cpus, bool) or not float(self.client_cpus).is_integer() or self.client_cpus < 1:
            raise ValueError(f"client_cpus={self.client_cpus!r}: Flower's simulation runtime gives each client a whole "
                             f"number of CPU cores (>= 1)")
        self.client_cpus = int(self.client_cpus)
        spec = FreezeSpec.from_dict(self.freeze)  # one spelling of "nothing frozen", so resumed runs compare equal
        self.freeze = spec.to_dict() if spec else {}
        if self.client_lr <= 0:
            raise ValueError(f"client_lr must be > 0, got {self.client_lr}")
        if self.client_app and (self.client_app.count(":") != 1 or not all(self.client_app.split(":"))):
            raise ValueError(f"client_app={self.client_app!r}: give module:function (a function that builds a "
                             f"Flower ClientApp from an FLConfig), or leave it empty for ours")

    @classmethod
    def from_mapping(cls, d: Any) -> FLConfig:
        """From a dict, an OmegaConf node or a Flower run config (kebab-case keys are accepted)."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(d, DictConfig):
            missing = sorted(OmegaConf.missing_keys(d))
            if missing:
                raise ValueError(f"federated config: {', '.join(missing)} not set (e.g. layerfx fl "
                                 f"{' '.join(m + '=...' for m in missing)})")
            d = OmegaConf.to_container(d, resolve=True)
        d = {k.replace("-", "_"): v for k, v in dict(d).items()}
        for k in ("plan", "freeze", "client_options"):
            if isinstance(d.get(k), str):  # Flower run configs are flat: nested values travel as JSON
                d[k] = json.loads(d[k])
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown federated config key(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def to_run_config(self) -> dict[str, Any]:
        """Flat, Flower-friendly form (nested values as JSON; None dropped)."""
        return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in asdict(self).items() if v is not None}


def client_manifests(cfg: FLConfig) -> list[Path]:
    """The client manifests, one per speaker, in a fixed order (partition id i is the i-th)."""
    folder = Path(cfg.corpus) / "clients"
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no client manifests in {folder} (make one with `layerfx make-corpus`)")
    if cfg.num_clients is not None:
        if not 1 <= cfg.num_clients <= len(paths):
            raise ValueError(f"num_clients={cfg.num_clients}, but {folder} has {len(paths)} client manifests")
        paths = paths[: cfg.num_clients]
    return paths


def make_plan(cfg: FLConfig, n_layers: int) -> DropoutPlan:
    """The run's DropoutPlan from ``cfg.plan``."""
    p = dict(cfg.plan)
    kind, label = p.pop("type", "flat"), p.pop("label", None)
    kinds = tuple(p.pop("kinds", ["ffn"]))
    if kind == "flat":
        plan = DropoutPlan.flat(n_layers, float(p.get("rate", 0.0)), kinds=kinds, mapping=cfg.mapping)
    elif kind in ("ambient", "critical"):
        if not p.get("report"):
            raise ValueError(f"plan type {kind!r} needs plan.report: a block-level probe.json of the global model")
        plan = DropoutPlan.targeted(p["report"], n=int(p["n"]), rate=float(p["rate"]),
                                    base_rate=float(p.get("base_rate", 0.0)), target=kind, kinds=kinds,
                                    mapping=cfg.mapping)
    elif kind == "explicit":
        plan = DropoutPlan(p["rates"], mapping=cfg.mapping, label="explicit")
    else:
        raise ValueError(f"unknown plan type {kind!r}; choose flat, ambient, critical or explicit")
    plan.label = label or plan.label
    return plan


def check_run(cfg: FLConfig) -> int:
    """Every input of a run checked before any round starts: model, plan (and its report), corpus, rule, optimizer;
    returns the number of clients."""
    from nemo_layerfx.fd import RULES, FreezeSpec, ServerOptimizer, choose_units, trained_names
    from nemo_layerfx.models import conformer_encoder

    if not Path(cfg.model).is_file():
        raise FileNotFoundError(f"no such global model: {cfg.model}")
    model = base_model(cfg.model)
    plan = make_plan(cfg, len(conformer_encoder(model).layers))
    choose_units(model, plan, cfg.seed)  # the plan fits the model and its encoder can be sliced
    trained_names(model, FreezeSpec.from_dict(cfg.freeze))  # the freeze spec names parts of this model
    clients = client_manifests(cfg)
    if not (Path(cfg.corpus) / "dev_manifest.json").is_file():
        raise FileNotFoundError(f"no dev manifest in {cfg.corpus} (the global model is scored on it)")
    if cfg.rule not in RULES:
        raise ValueError(f"unknown aggregation rule {cfg.rule!r}; choose zero_fill or coverage")
    ServerOptimizer(cfg.server_opt, lr=cfg.server_lr)
    return len(clients)


@functools.lru_cache(maxsize=2)
def base_model(path: str):
    """The global architecture, restored once per process (a client reuses it every round; never modified)."""
    from nemo_layerfx.models import restore

    return restore(path).eval()


_BUDGETS: dict[tuple, int] = {}


def _divisors(n: int) -> list[int]:
    """The pass sizes a local step of ``n`` utterances can be split into evenly, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def pass_size(full, sub, manifest: str | Path, cfg: FLConfig) -> int:
    """Utterances per forward/backward pass for ``sub`` on this client: ``batch_size`` when no
    ``micro_batch_size`` is set, else the largest divisor of ``batch_size`` whose pass on the client's longest
    utterances holds no more memory (``nemo_layerfx.memory.training_memory``) than ``micro_batch_size`` of them
    take with the full model ``full``. Never below ``micro_batch_size``."""
    micro = cfg.micro_batch_size
    if micro is None or micro == cfg.batch_size:
        return cfg.batch_size
    from nemo_layerfx.evaluate import audio_batches, read_manifest
    from nemo_layerfx.memory import training_memory

    rows = sorted(read_manifest(manifest), key=lambda r: -float(r["duration"]))[: cfg.batch_size]

    def held(model, n: int) -> int:
        audio, lengths, texts = next(audio_batches(rows[:n], n, model._cfg.sample_rate, "cpu"))
        return training_memory(model, audio, lengths, texts)["total"]

    key = (id(full), str(manifest), micro, cfg.batch_size)
    if key not in _BUDGETS:  # the full model's memory at micro_batch_size on this client: the same every round
        _BUDGETS[key] = held(full, micro)
    budget = _BUDGETS[key]
    for m in reversed([d for d in _divisors(cfg.batch_size) if d > micro]):
        if m <= len(rows) and held(sub, m) <= budget:
            return m
    return micro


def train_submodel(sub, manifest: str | Path, cfg: FLConfig, seed: int, full=None) -> tuple[int, float]:
    """E local SGD steps on one client's manifest with NeMo's own training step and loss; (examples, last loss).

    With ``cfg.micro_batch_size`` each step of ``batch_size`` utterances runs as accumulated passes of
    ``pass_size(full, sub, ...)`` utterances (``full``: the global model, needed then). The gradient is the same
    as one pass's, except at an epoch's last, partial step (Lightning weights every pass of a step alike) and for
    the random draws of dither and SpecAugment, which follow the pass shapes."""
    import lightning.pytorch as pl
    from omegaconf import open_dict

    if cfg.micro_batch_size is not None and full is None:
        raise ValueError("micro_batch_size is set: train_submodel needs the full model (full=...) to size passes")
    per_pass = cfg.batch_size if full is None else pass_size(full, sub, manifest, cfg)
    passes = cfg.batch_size // per_pass
    pl.seed_everything(seed, workers=True, verbose=False)
    with open_dict(sub._cfg):
        sub._cfg.optim = {"name": "sgd", "lr": cfg.client_lr}
    sub.setup_training_data({"manifest_filepath": str(manifest), "sample_rate": sub._cfg.sample_rate,
                             "batch_size": per_pass, "shuffle": True, "num_workers": 0})
    losses: list[float] = []

    class _Last(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            losses.append(float(loss))

    trainer = pl.Trainer(max_steps=cfg.local_steps, max_epochs=10_000, accelerator=cfg.accelerator, devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         gradient_clip_val=cfg.clip_grad, accumulate_grad_batches=passes,
                         callbacks=[_Last()])
    sub.set_trainer(trainer)
    trainer.fit(sub)
    sub.cpu()
    n = sum(1 for line in Path(manifest).read_text().splitlines() if line.strip())
    # the last step's passes; Lightning reports each pass's loss divided by their number, so they sum to the step's
    return n, sum(losses[-passes:]) if losses else math.nan


# --- checkpoints ---------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Write ``out/checkpoint.pt`` atomically (temporary file + rename): a kill leaves the previous one intact."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "checkpoint.pt")


def load_checkpoint(out: Path, cfg: FLConfig) -> dict[str, Any] | None:
    """The last completed round's state, or None; clear errors for a corrupt file or a different run's config."""
    path = out / "checkpoint.pt"
    if not cfg.resume or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"federated checkpoint {path} is corrupt ({type(e).__name__}: {e}); delete it to start "
                         f"over, or restore a backup") from e
    saved = state.get("config", {})
    for key in ("model", "plan", "freeze", "mapping", "rule", "server_opt", "seed", "num_clients", "local_steps"):
        if saved.get(key, {} if key == "freeze" else None) != asdict(cfg).get(key):  # runs before freeze existed
            raise ValueError(f"{path} belongs to a run with {key}={saved.get(key)!r}, this run has "
                             f"{key}={asdict(cfg).get(key)!r}; use another out folder or resume=false")
    return state


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``out/metrics.jsonl``, one per evaluated round (none when the run has not evaluated yet)."""
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_metrics(out: str | Path) -> Path:
    """``out/metrics.png``: dev WER of the global model per round, and the bytes each way per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = read_metrics(out)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["round"] for r in rows], [r["dev_wer"] for r in rows], marker="o")
    a.set_xlabel("round")
    a.set_ylabel("dev WER (global model)")
    trained = [r for r in rows if r.get("clients")]
    b.bar([r["round"] - 0.2 for r in trained], [sum(c["bytes_down"] for c in r["clients"]) / 1e6 for r in trained],
          width=0.4, label="to clients")
    b.bar([r["round"] + 0.2 for r in trained], [sum(c["bytes_up"] for c in r["clients"]) / 1e6 for r in trained],
          width=0.4, label="from clients")
    b.set_xlabel("round")
    b.set_ylabel("MB (aggregated clients)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    return out / "metrics.png"
