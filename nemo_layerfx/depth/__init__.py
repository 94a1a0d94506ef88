"""Layer reduction (Tian et al. 2021): parameter-shared layers, sampled depth in training, any-depth inference,
the per-depth sweep with layer consistency, and masked-reconstruction pretraining.

    model.encoder.share_layers: 1                      # one parameter set for every layer (PSS); core field
    model.encoder.depth_sampling: {low: 2, high: 8}    # N ~ U{2..8} per optimizer step (with DepthSampling)
    model.encoder.inference_depth: 5                   # SLI(5): eval forwards run 5 layers; core field
    report = depth_sweep(model, "dev_manifest.json")   # WER / loss / RTF at every depth, consistency per layer pair

Composes with: low-rank layers (a shared set is factorized once) and every NeMo model class (CTC, RNNT, hybrid).
Refused with a clear error: federated-dropout ``extract``, pruning and the importance probe on *shared* layers
(unshare first; the sweep works on shared models), and depth sampling with cache-aware streaming.
"""

from nemo_layerfx.lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "DepthSampler": "nemo_layerfx.depth.sampling",
    "DepthSampling": "nemo_layerfx.depth.sampling",
    "set_depth_file": "nemo_layerfx.depth.sharing",
    "set_inference_depth": "nemo_layerfx.depth.sharing",
    "unshare": "nemo_layerfx.depth.sharing",
    "unshare_file": "nemo_layerfx.depth.sharing",
    "DepthReport": "nemo_layerfx.depth.sweep",
    "depth_sweep": "nemo_layerfx.depth.sweep",
    "plot_sweep": "nemo_layerfx.depth.sweep",
})
