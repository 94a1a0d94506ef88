"""Low-rank training from scratch: SVD-initialized factorized linears with layer-wise rank maps
(Fernandez-Lopez et al. 2025, "Full-Rank No More").

    # config: the encoder builds factorized layers (LR-SMS: MHSA ramp 0.1 -> 0.2, FFN ramp 0.2 -> 0.5)
    model.encoder.low_rank: {att: [0.1, 0.2], ffn: [0.2, 0.5]}
    # Python: factorize a trained model by truncated SVD, and back
    small, report = lowrank(model, LowRankConfig(att=[0.1, 0.2], ffn=[0.2, 0.5]))
    dense, _ = merge(small)

Importing this package registers the ``low_rank`` encoder option (``import nemo_layerfx`` does it).
"""

from nemo_layerfx.encoder import register_encoder_option
from nemo_layerfx.lowrank.analysis import alphas_from_report, energy_profile, energy_rank
from nemo_layerfx.lowrank.config import LowRankConfig, block_alphas, parse_spec, rank_for
from nemo_layerfx.lowrank.linear import LowRankLinear, factorized_params, spectral_factors
from nemo_layerfx.lowrank.rewrite import (
    RankReport, apply_option, factorize_, low_rank_modules, lowrank, lowrank_file, merge, merge_file,
)

register_encoder_option("low_rank", apply_option, order=20)

__all__ = ["alphas_from_report", "energy_profile", "energy_rank", "LowRankConfig", "LowRankLinear", "RankReport",
           "block_alphas", "factorize_", "factorized_params",
           "low_rank_modules", "lowrank", "lowrank_file", "merge", "merge_file", "parse_spec", "rank_for",
           "spectral_factors"]
