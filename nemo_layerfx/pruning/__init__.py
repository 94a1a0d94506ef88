"""Adaptive-dropout pruning (Kubo, Cai, Bacchiani 2024): learnable Gumbel retention gates on FFN units, per-head
query/key and value dimensions and conv groups, then a physically smaller NeMo model.

    model.encoder.adaptive_dropout: {locations: [ffn, qk, v, conv], steps: 2000}   # + the AdaptiveDropout callback
    small, report = prune(gated_model)          # units with β < c∞ removed; same outputs, fewer parameters
    survival = survival_report(gated_model)     # per layer x location: surviving share, expected retention

Composes with: the probe and the depth sweep (gated models evaluate with their deterministic masks), and the
federated-dropout extractor *after* pruning (a pruned model keeps every head, so FFN and conv units can still be
dropped; whole heads of per-head-width layers cannot). Refused with a clear error: gates on low-rank layers, on
parameter-shared layers and on BatchNorm encoders, and federated-dropout ``extract`` of a gated (unpruned) model.
"""

from nemo_layerfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "add_gates": "nemo_layerfx.pruning.apply",
    "gates_of": "nemo_layerfx.pruning.apply",
    "kept_units": "nemo_layerfx.pruning.apply",
    "remove_gates": "nemo_layerfx.pruning.apply",
    "AdaptiveDropout": "nemo_layerfx.pruning.callback",
    "regularizer": "nemo_layerfx.pruning.callback",
    "AdaptiveDropoutConfig": "nemo_layerfx.pruning.config",
    "LOCATIONS": "nemo_layerfx.pruning.config",
    "GateSchedule": "nemo_layerfx.pruning.gates",
    "GatedInput": "nemo_layerfx.pruning.gates",
    "GatedOutput": "nemo_layerfx.pruning.gates",
    "RetentionGate": "nemo_layerfx.pruning.gates",
    "PruneReport": "nemo_layerfx.pruning.prune",
    "effective_params": "nemo_layerfx.pruning.prune",
    "prune": "nemo_layerfx.pruning.prune",
    "prune_file": "nemo_layerfx.pruning.prune",
    "SurvivalReport": "nemo_layerfx.pruning.report",
    "as_probe_report": "nemo_layerfx.pruning.report",
    "plot_survival": "nemo_layerfx.pruning.report",
    "survival_report": "nemo_layerfx.pruning.report",
})
