"""Low-rank training from scratch: SVD-initialized factorized linears with layer-wise rank maps
(Fernandez-Lopez et al. 2025, "Full-Rank No More").

    # config: the encoder builds factorized layers (LR-SMS: MHSA ramp 0.1 -> 0.2, FFN ramp 0.2 -> 0.5)
    model.encoder.low_rank: {att: [0.1, 0.2], ffn: [0.2, 0.5]}
    # Python: factorize a trained model by truncated SVD, and back
    small, report = lowrank(model, LowRankConfig(att=[0.1, 0.2], ffn=[0.2, 0.5]))
    dense, _ = merge(small)
"""

from nemo_layerfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "alphas_from_report": "nemo_layerfx.lowrank.analysis",
    "energy_profile": "nemo_layerfx.lowrank.analysis",
    "energy_rank": "nemo_layerfx.lowrank.analysis",
    "LowRankConfig": "nemo_layerfx.lowrank.config",
    "block_alphas": "nemo_layerfx.lowrank.config",
    "parse_spec": "nemo_layerfx.lowrank.config",
    "rank_for": "nemo_layerfx.lowrank.config",
    "LowRankLinear": "nemo_layerfx.lowrank.linear",
    "factorized_params": "nemo_layerfx.lowrank.linear",
    "spectral_factors": "nemo_layerfx.lowrank.linear",
    "RankReport": "nemo_layerfx.lowrank.rewrite",
    "factorize_": "nemo_layerfx.lowrank.rewrite",
    "low_rank_modules": "nemo_layerfx.lowrank.rewrite",
    "lowrank": "nemo_layerfx.lowrank.rewrite",
    "lowrank_file": "nemo_layerfx.lowrank.rewrite",
    "merge": "nemo_layerfx.lowrank.rewrite",
    "merge_file": "nemo_layerfx.lowrank.rewrite",
})
