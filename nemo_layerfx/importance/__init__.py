"""Layer importance (Zhou et al. 2021): re-init / re-rand probes, churn, ranking agreement, the training callback.

    report = probe(model, "dev_manifest.json", ProbeConfig(modes=("reinit", "rerand"), draws=3),
                   init="runs/init_layers.safetensors")

Modules: ``resets`` (snapshots, fresh draws, exact restore, churn), ``probe`` (the probe and its report),
``compare`` (agreement across reports), ``plot`` and ``callback`` (``LayerImportanceCallback``). The evaluation
helpers it is built on live in the core (``nemo_layerfx.evaluate``).
"""

from nemo_layerfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "compare_reports": "nemo_layerfx.importance.compare",
    "spearman": "nemo_layerfx.importance.compare",
    "plot_history": "nemo_layerfx.importance.plot",
    "plot_report": "nemo_layerfx.importance.plot",
    "MODES": "nemo_layerfx.importance.config",
    "ProbeConfig": "nemo_layerfx.importance.config",
    "ProbeReport": "nemo_layerfx.importance.probe",
    "UNITS": "nemo_layerfx.importance.config",
    "ambient_units": "nemo_layerfx.importance.probe",
    "probe": "nemo_layerfx.importance.probe",
    "run_variants": "nemo_layerfx.importance.probe",
    "check_snapshot": "nemo_layerfx.importance.resets",
    "churn": "nemo_layerfx.importance.resets",
    "fresh_draw": "nemo_layerfx.importance.resets",
    "init_state": "nemo_layerfx.importance.resets",
    "layer_snapshot": "nemo_layerfx.importance.resets",
    "load_snapshot": "nemo_layerfx.importance.resets",
    "probe_units": "nemo_layerfx.importance.resets",
    "save_snapshot": "nemo_layerfx.importance.resets",
    "swapped": "nemo_layerfx.importance.resets",
})
