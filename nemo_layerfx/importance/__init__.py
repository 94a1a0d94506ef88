"""Layer importance (Zhou et al. 2021): re-init / re-rand probes, churn, ranking agreement, the training callback.

    report = probe(model, "dev_manifest.json", ProbeConfig(modes=("reinit", "rerand"), draws=3),
                   init="runs/init_layers.safetensors")

Modules: ``resets`` (snapshots, fresh draws, exact restore, churn), ``probe`` (the probe and its report),
``compare`` (agreement across reports), ``plot`` and ``callback`` (``LayerImportanceCallback``). The evaluation
helpers it is built on live in the core (``nemo_layerfx.evaluate``).
"""

from nemo_layerfx.importance.compare import compare_reports, spearman
from nemo_layerfx.importance.plot import plot_history, plot_report
from nemo_layerfx.importance.probe import (
    MODES, UNITS, ProbeConfig, ProbeReport, ambient_units, probe, run_variants,
)
from nemo_layerfx.importance.resets import (
    check_snapshot, churn, fresh_draw, init_state, layer_snapshot, load_snapshot, probe_units,
    save_snapshot, swapped,
)

__all__ = ["MODES", "UNITS", "ProbeConfig", "ProbeReport", "ambient_units", "check_snapshot",
           "churn", "compare_reports", "fresh_draw", "init_state", "layer_snapshot", "load_snapshot", "plot_history",
           "plot_report", "probe", "probe_units", "run_variants", "save_snapshot", "spearman", "swapped"]
