"""CUDA check: the shipped tiny CTC / RNNT / hybrid configs train on a GPU with NeMo's CUDA losses.

Runs a few real training steps of each model through the entry point's ``train()`` on the GPU, checks that the
weights and the loss live on CUDA and stay finite, records which loss implementation ran, and checks the
encoder's padding exactness on CUDA. Writes results/cuda_training.{json,md}.

    python benchmarks/cuda_training.py --corpus data/commands
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

import nemo_layerfx
from nemo.collections.asr.modules import ConformerEncoder
from nemo_layerfx.encoder import GroupNormConformerEncoder
from nemo_layerfx.train import compose_config, train

class DeviceProbe(pl.Callback):
    """Records, during training, where the weights and the loss tensor live (fit moves the model back after)."""

    def __init__(self):
        self.param_devices: set[str] = set()
        self.loss_devices: set[str] = set()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.param_devices |= {p.device.type for p in pl_module.parameters()}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss_devices.add(loss.device.type)
        self.losses.append(float(loss))


CONFIGS = ["conformer_gn_tiny", "conformer_gn_transducer_tiny", "conformer_gn_hybrid_tiny"]


def padding_drift(cls, device) -> float:
    torch.manual_seed(0)
    enc = cls(feat_in=80, n_layers=2, d_model=64, n_heads=4, conv_norm_type="group_norm8", dropout=0.0,
              dropout_pre_encoder=0.0, dropout_emb=0.0).to(device).eval()
    a = torch.randn(1, 80, 200, device=device)
    alone, n = enc(audio_signal=a, length=torch.tensor([200], device=device))
    padded = torch.cat([a, torch.zeros(1, 80, 400, device=device)], dim=2)
    batch = torch.cat([padded, torch.randn(1, 80, 600, device=device)])
    out, _ = enc(audio_signal=batch, length=torch.tensor([200, 600], device=device))
    return (alone[0, :, : int(n[0])] - out[0, :, : int(n[0])]).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--exp-dir", default="/tmp/layerfx_cuda_runs")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    device = torch.device("cuda")
    result = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "nemo": __import__("nemo").__version__, "nemo_layerfx": nemo_layerfx.__version__, "models": {}}
    for name in CONFIGS:
        over = [f"corpus_dir={args.corpus}", "trainer.accelerator=gpu", "trainer.devices=1",
                f"trainer.max_steps={args.steps}", "trainer.max_epochs=100", "++trainer.limit_val_batches=2",
                f"exp_manager.exp_dir={args.exp_dir}", "exp_manager.create_checkpoint_callback=false",
                "layerfx.report_wer=true"]
        cfg = compose_config(name, over)
        probe = DeviceProbe()
        t0 = time.perf_counter()
        model = train(cfg, extra_callbacks=[probe])
        wall = time.perf_counter() - t0
        params_cuda = probe.param_devices == {"cuda"} and probe.loss_devices == {"cuda"}
        loss = model.loss if hasattr(model, "loss") else None
        loss_impl = type(getattr(loss, "_loss", loss)).__name__ if loss is not None else None
        metrics = {k: float(v) for k, v in model.trainer.callback_metrics.items()}
        result["models"][name] = {
            "class": type(model).__name__, "encoder": type(model.encoder).__name__, "steps": model.trainer.global_step,
            "params_on_cuda": params_cuda, "loss_impl": loss_impl, "wall_s_incl_build_and_2_validations": wall,
            "final_metrics": metrics, "first_train_loss": probe.losses[0], "last_train_loss": probe.losses[-1],
            "finite": all(torch.isfinite(torch.tensor([*metrics.values(), *probe.losses])).tolist()),
        }
        print(name, json.dumps(result["models"][name]), flush=True)
    # cuDNN convolutions default to TF32 on Ampere+ GPUs (~1e-3 relative noise that depends on the tensor shape),
    # so the float32 exactness claim is checked with TF32 off; the TF32 figure is reported beside it.
    drift = {}
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        drift[f"tf32_{'on' if tf32 else 'off'}"] = {
            "layerfx_group_norm": padding_drift(GroupNormConformerEncoder, device),
            "nemo_group_norm8": padding_drift(ConformerEncoder, device)}
    result["padding_drift_cuda"] = drift
    ok = all(m["params_on_cuda"] and m["finite"] and m["steps"] == args.steps for m in result["models"].values())
    result["all_ok"] = ok and drift["tf32_off"]["layerfx_group_norm"] <= 1e-5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_training.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# CUDA training check ({result['device_name']}; torch {result['torch']}, NeMo {result['nemo']})", "",
             "| config | model | steps | weights and loss on CUDA | loss | train loss first -> last | final val_wer |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        fm = m["final_metrics"]
        lines.append(f"| {name} | {m['class']} | {m['steps']} | {m['params_on_cuda']} | {m['loss_impl']} | "
                     f"{m['first_train_loss']:.1f} -> {m['last_train_loss']:.1f} | {fm.get('val_wer', float('nan')):.3f} |")
    lines += ["", "Padding drift on CUDA (max abs diff on an utterance's valid frames, alone vs. padded by 400 frames "
              "in a batch):", ""]
    for mode, d in drift.items():
        lines.append(f"- {mode}: ours {d['layerfx_group_norm']:.2e}, NeMo group_norm8 {d['nemo_group_norm8']:.2e}")
    lines += ["",
              f"All checks passed: {result['all_ok']}."]
    (out / "cuda_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
