"""nemo_layerfx: cheaper Conformer ASR training in NeMo by exploiting how unequal its layers are.

Importing the package registers it with NeMo (``_target_`` allow-list, adapter registry), so configs and
``.nemo`` files that name ``nemo_layerfx.*`` classes build and restore.
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
    mask_units_,
    plan_param_count,
)
from nemo_layerfx.units import UNIT_MAP  # noqa: E402
from nemo_layerfx.encoder import (  # noqa: E402
    GroupNormConformerEncoder,
    MaskedConformerConvolution,
    MaskedGroupNorm,
    stock_encoder_config,
)

__version__ = "0.1.0"

__all__ = [
    "DropoutPlan",
    "ServerOptimizer",
    "UNIT_MAP",
    "aggregate",
    "choose_units",
    "expand",
    "extract",
    "mask_units_",
    "plan_param_count",
    "GroupNormConformerEncoder",
    "LayerImportanceCallback",
    "LossHistory",
    "ProbeConfig",
    "ProbeReport",
    "layer_snapshot",
    "load_snapshot",
    "plot_report",
    "probe",
    "save_snapshot",
    "MaskedConformerConvolution",
    "MaskedGroupNorm",
    "convert_norm",
    "register",
    "stock_encoder_config",
]
