"""How much memory a training step holds, counted exactly rather than read from an allocator.

A step holds the parameters, their gradients, the optimizer's per-parameter state and every tensor autograd saves
for backward. The last is counted by distinct storage through ``saved_tensors_hooks`` during a real forward and
loss, so the count is the same on every machine and the same for CPU and CUDA. Federated clients use it to size
their passes (``nemo_layerfx.fl.task.pass_size``); the benchmarks report it.
"""

from __future__ import annotations

import torch
from torch import nn

from nemo_layerfx.evaluate import model_loss, targets_of


def training_memory(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor, texts: list[str],
                    moments: int = 0) -> dict[str, int]:
    """Bytes one training step of ``model`` on this batch holds: parameters, gradients, ``moments`` optimizer
    tensors per parameter (SGD 0, momentum 1, Adam 2) and the tensors saved for backward by the preprocessor,
    encoder, decoder and loss (CTC, RNNT, or both for a hybrid model). The model's mode and weights are unchanged;
    no gradient is left behind."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved weights are not activations
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    was = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            feats, flen = model.preprocessor(input_signal=audio, length=lengths)
            encoded, enc_len = model.encoder(audio_signal=feats, length=flen)
            model_loss(model, encoded, enc_len, texts)
            if hasattr(model, "ctc_decoder"):  # hybrid: the auxiliary CTC head trains too
                targets, tl = targets_of(model, texts, audio.device)
                model.ctc_loss(log_probs=model.ctc_decoder(encoder_output=encoded), targets=targets,
                               input_lengths=enc_len, target_lengths=tl)
    finally:
        model.train(was)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    out = {"parameters": params + frozen, "gradients": params, "optimizer_state": moments * params,
           "saved_activations": sum(seen.values())}
    out["total"] = sum(out.values())
    return out
