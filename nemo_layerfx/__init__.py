"""nemo_layerfx: cheaper Conformer ASR training in NeMo by exploiting how unequal its layers are.

Importing the package registers it with NeMo's ``_target_`` allow-list (now, or as soon as NeMo is imported), so
configs and ``.nemo`` files that name ``nemo_layerfx.*`` classes build and restore, and declares the capability
subpackages' encoder options (``low_rank``, ``depth_sampling``, ``adaptive_dropout``), imported when a config names
them. The public names below load on first use
(``nemo_layerfx.lazy``): a light module such as a config class imports without NeMo.

Layout: the core (``encoder`` with its modules, ``units``, ``surgery``, ``models``, ``evaluate``, ``memory``,
``registration``, ``train``) and one subpackage per capability: ``importance``, ``fd`` (federated dropout), ``fl``
(Flower apps, optional), ``lowrank``, ``depth``, ``pruning``. Capabilities import the core, not each other.
"""

from nemo_layerfx.lazy import attach
from nemo_layerfx.options import declare_encoder_option
from nemo_layerfx.registration import register_on_nemo_import

register_on_nemo_import()
# the capability subpackages' encoder config keys, imported when a config names them
declare_encoder_option("low_rank", "nemo_layerfx.lowrank.rewrite:OPTION")
declare_encoder_option("depth_sampling", "nemo_layerfx.depth.sampling:OPTION")
declare_encoder_option("adaptive_dropout", "nemo_layerfx.pruning.apply:OPTION")

__version__ = "0.2.0"

__getattr__, __dir__, __all__ = attach(__name__, {
    "register": "nemo_layerfx.registration",
    # the encoder
    "GroupNormConformerEncoder": "nemo_layerfx.encoder",
    "stock_encoder_config": "nemo_layerfx.encoder",
    "MaskedConformerConvolution": "nemo_layerfx.encoder.conv",
    "MaskedGroupNorm": "nemo_layerfx.encoder.conv",
    "fused_group_norm": "nemo_layerfx.encoder.fused_gn",
    "UNIT_MAP": "nemo_layerfx.units",
    "mask_units_": "nemo_layerfx.surgery",
    "clone_model": "nemo_layerfx.models",
    "conformer_encoder": "nemo_layerfx.models",
    "restore": "nemo_layerfx.models",
    "convert_norm": "nemo_layerfx.convert",
    "training_memory": "nemo_layerfx.memory",
    # layer importance
    "LayerImportanceCallback": "nemo_layerfx.callbacks",
    "LossHistory": "nemo_layerfx.callbacks",
    "ProbeConfig": "nemo_layerfx.importance.config",
    "ProbeReport": "nemo_layerfx.importance.probe",
    "probe": "nemo_layerfx.importance.probe",
    "layer_snapshot": "nemo_layerfx.importance.resets",
    "load_snapshot": "nemo_layerfx.importance.resets",
    "save_snapshot": "nemo_layerfx.importance.resets",
    "plot_report": "nemo_layerfx.importance.plot",
    # federated dropout
    "DropoutPlan": "nemo_layerfx.fd.plan",
    "choose_units": "nemo_layerfx.fd.plan",
    "ServerOptimizer": "nemo_layerfx.fd.aggregate",
    "aggregate": "nemo_layerfx.fd.aggregate",
    "expand": "nemo_layerfx.fd.aggregate",
    "extract": "nemo_layerfx.fd.extract",
    "plan_param_count": "nemo_layerfx.fd.extract",
    # low rank
    "LowRankConfig": "nemo_layerfx.lowrank.config",
    "LowRankLinear": "nemo_layerfx.lowrank.linear",
    "lowrank": "nemo_layerfx.lowrank.rewrite",
    "merge": "nemo_layerfx.lowrank.rewrite",
    # depth
    "DepthSampling": "nemo_layerfx.depth.sampling",
    "depth_sweep": "nemo_layerfx.depth.sweep",
    "set_inference_depth": "nemo_layerfx.depth.sharing",
    "unshare": "nemo_layerfx.depth.sharing",
    # pruning
    "AdaptiveDropout": "nemo_layerfx.pruning.callback",
    "prune": "nemo_layerfx.pruning.prune",
    "survival_report": "nemo_layerfx.pruning.report",
})
