"""nemo_layerfx: cheaper Conformer ASR training in NeMo by exploiting how unequal its layers are.

Importing the package registers it with NeMo (``_target_`` allow-list, adapter registry) and registers the
encoder options of the capability subpackages (``low_rank``, ``depth_sampling``, ``adaptive_dropout``), so configs
and ``.nemo`` files that name ``nemo_layerfx.*`` classes build and restore.

Layout: the core (``encoder`` with its modules, ``units``, ``surgery``, ``models``, ``evaluate``, ``memory``, ``registration``,
``train``) and one subpackage per capability: ``importance``, ``fd`` (federated dropout), ``fl`` (Flower apps,
optional), ``lowrank``, ``depth``, ``pruning``. Capabilities import the core, not each other.
"""

from nemo_layerfx.registration import register

register()

from nemo_layerfx.callbacks import LayerImportanceCallback, LossHistory  # noqa: E402
from nemo_layerfx.convert import convert_norm  # noqa: E402
from nemo_layerfx.importance import (  # noqa: E402
    ProbeConfig,
    ProbeReport,
    layer_snapshot,
    load_snapshot,
    plot_report,
    probe,
    save_snapshot,
)
from nemo_layerfx.fd import (  # noqa: E402
    DropoutPlan,
    ServerOptimizer,
    aggregate,
    choose_units,
    expand,
    extract,
    plan_param_count,
)
from nemo_layerfx.surgery import mask_units_  # noqa: E402
from nemo_layerfx.lowrank import LowRankConfig, LowRankLinear, lowrank, merge  # noqa: E402
from nemo_layerfx.depth import DepthSampling, depth_sweep, set_inference_depth, unshare  # noqa: E402
from nemo_layerfx.pruning import AdaptiveDropout, prune, survival_report  # noqa: E402
from nemo_layerfx.models import clone_model, conformer_encoder, restore  # noqa: E402
from nemo_layerfx.memory import training_memory  # noqa: E402
from nemo_layerfx.units import UNIT_MAP  # noqa: E402
from nemo_layerfx.encoder.fused_gn import fused_group_norm  # noqa: E402
from nemo_layerfx.encoder import GroupNormConformerEncoder, stock_encoder_config  # noqa: E402
from nemo_layerfx.encoder.conv import MaskedConformerConvolution, MaskedGroupNorm  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "AdaptiveDropout",
    "DepthSampling",
    "DropoutPlan",
    "ServerOptimizer",
    "UNIT_MAP",
    "aggregate",
    "choose_units",
    "expand",
    "fused_group_norm",
    "extract",
    "mask_units_",
    "plan_param_count",
    "GroupNormConformerEncoder",
    "LayerImportanceCallback",
    "LossHistory",
    "LowRankConfig",
    "LowRankLinear",
    "ProbeConfig",
    "ProbeReport",
    "clone_model",
    "conformer_encoder",
    "depth_sweep",
    "layer_snapshot",
    "load_snapshot",
    "lowrank",
    "merge",
    "plot_report",
    "probe",
    "prune",
    "restore",
    "save_snapshot",
    "set_inference_depth",
    "unshare",
    "MaskedConformerConvolution",
    "MaskedGroupNorm",
    "convert_norm",
    "register",
    "stock_encoder_config",
    "survival_report",
    "training_memory",
]
