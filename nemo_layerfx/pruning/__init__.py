"""Adaptive-dropout pruning (Kubo, Cai, Bacchiani 2024): learnable Gumbel retention gates on FFN units, per-head
query/key and value dimensions and conv groups, then a physically smaller NeMo model.

    model.encoder.adaptive_dropout: {locations: [ffn, qk, v, conv], steps: 2000}   # + the AdaptiveDropout callback
    small, report = prune(gated_model)          # units with β < c∞ removed; same outputs, fewer parameters
    survival = survival_report(gated_model)     # per layer x location: surviving share, expected retention

Importing this package registers the ``adaptive_dropout`` encoder option (``import nemo_layerfx`` does it).

Composes with: the probe and the depth sweep (gated models evaluate with their deterministic masks), and the
federated-dropout extractor *after* pruning (a pruned model keeps every head, so FFN and conv units can still be
dropped; whole heads of per-head-width layers cannot). Refused with a clear error: gates on low-rank layers, on
parameter-shared layers and on BatchNorm encoders, and federated-dropout ``extract`` of a gated (unpruned) model.
"""

from nemo_layerfx.encoder import register_encoder_option
from nemo_layerfx.pruning.apply import add_gates, apply_option, gates_of, kept_units, remove_gates
from nemo_layerfx.pruning.callback import AdaptiveDropout, regularizer
from nemo_layerfx.pruning.config import LOCATIONS, AdaptiveDropoutConfig
from nemo_layerfx.pruning.gates import GatedInput, GatedOutput, GateSchedule, RetentionGate
from nemo_layerfx.pruning.prune import PruneReport, effective_params, prune, prune_file
from nemo_layerfx.pruning.report import SurvivalReport, as_probe_report, plot_survival, survival_report

register_encoder_option("adaptive_dropout", apply_option, order=40)

__all__ = ["AdaptiveDropout", "AdaptiveDropoutConfig", "GateSchedule", "GatedInput", "GatedOutput", "LOCATIONS",
           "PruneReport", "RetentionGate", "SurvivalReport", "add_gates", "as_probe_report", "effective_params",
           "gates_of", "kept_units", "plot_survival", "prune", "prune_file", "regularizer", "remove_gates",
           "survival_report"]
