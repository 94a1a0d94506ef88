"""Layer reduction (Tian et al. 2021): parameter-shared layers, sampled depth in training, any-depth inference,
the per-depth sweep with layer consistency, and masked-reconstruction pretraining.

    model.encoder.share_layers: 1                      # one parameter set for every layer (PSS); core field
    model.encoder.depth_sampling: {low: 2, high: 8}    # N ~ U{2..8} per optimizer step (with DepthSampling)
    model.encoder.inference_depth: 5                   # SLI(5): eval forwards run 5 layers; core field
    report = depth_sweep(model, "dev_manifest.json")   # WER / loss / RTF at every depth, consistency per layer pair

Importing this package registers the ``depth_sampling`` encoder option (``import nemo_layerfx`` does it).

Composes with: low-rank layers (a shared set is factorized once) and every NeMo model class (CTC, RNNT, hybrid).
Refused with a clear error: federated-dropout ``extract``, pruning and the importance probe on *shared* layers
(unshare first; the sweep works on shared models), and depth sampling with cache-aware streaming.
"""

from nemo_layerfx.depth.sampling import DepthSampler, DepthSampling, apply_option
from nemo_layerfx.depth.sharing import set_depth_file, set_inference_depth, unshare, unshare_file
from nemo_layerfx.depth.sweep import DepthReport, depth_sweep, plot_sweep
from nemo_layerfx.encoder import register_encoder_option

register_encoder_option("depth_sampling", apply_option, order=30, training_only=True)

__all__ = ["DepthReport", "DepthSampler", "DepthSampling", "depth_sweep", "plot_sweep", "set_depth_file",
           "set_inference_depth", "unshare", "unshare_file"]
