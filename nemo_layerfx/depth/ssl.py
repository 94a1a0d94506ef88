"""Masked-reconstruction pretraining as in Tian et al. (TERA-style time masking, a linear predictor, L1 loss),
in NeMo's own ``SpeechEncDecSelfSupervisedModel``.

NeMo's model supplies the training loop: it keeps the clean features, masks them with its ``spec_augment`` module,
encodes, and hands (clean features, mask, decoder output) to ``loss``. Three pieces are ours, because NeMo's do not
match the paper:

- ``BlockTimeMasking``: zeroes blocks of 7 frames covering 15 % of *each* utterance's frames (NeMo's
  ``MaskedPatchAugmentation`` sizes the masked fraction by the shortest utterance of the batch);
- ``LinearReconstructionDecoder``: one linear map from every encoder frame to the ``subsampling`` feature frames
  it covers (NeMo's ``ConvASRDecoderReconstruction`` always has a hidden layer and a non-linearity);
- ``MaskedReconstructionLoss``: the mean L1 distance over all valid frames, as the paper's formula is written, or
  over the masked frames only (``masked_only: true``, the usual TERA choice).

Fine-tune a CTC model from the pretrained encoder through NeMo's ``init_from_nemo_model`` (``include:
[encoder]``), frozen or not with NeMo's ``model.freeze_updates`` (``conf/conformer_gn_shared_finetune.yaml``).

Shape notation: B batch, F features, T feature frames, T' = T / subsampling encoder frames, D d_model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from nemo.core.classes import Loss, NeuralModule, typecheck
from nemo.core.neural_types import (
    AcousticEncodedRepresentation, LengthsType, LossType, NeuralType, SpectrogramType,
)
from torch import nn


class BlockTimeMasking(NeuralModule):
    """Zero ``round(fraction * T_i / block)`` non-overlapping blocks of ``block`` frames in every utterance i
    (Tian: 7-frame blocks over 15 % of the frames), at random block positions."""

    def __init__(self, block: int = 7, fraction: float = 0.15):
        super().__init__()
        if block < 1 or not 0.0 < fraction < 1.0:
            raise ValueError(f"BlockTimeMasking needs block >= 1 and 0 < fraction < 1, got {block}, {fraction}")
        self.block, self.fraction = int(block), float(fraction)

    @property
    def input_types(self):
        return {"input_spec": NeuralType(("B", "D", "T"), SpectrogramType()),
                "length": NeuralType(tuple("B"), LengthsType())}

    @property
    def output_types(self):
        return {"augmented_spec": NeuralType(("B", "D", "T"), SpectrogramType())}

    @typecheck()
    @torch.no_grad()
    def forward(self, input_spec: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        out = input_spec.clone()
        for i, n in enumerate(length.tolist()):
            blocks = n // self.block
            k = min(blocks, round(self.fraction * n / self.block))
            for b in torch.randperm(blocks)[:k].tolist():
                out[i, :, b * self.block:(b + 1) * self.block] = 0.0
        return out


class LinearReconstructionDecoder(NeuralModule):
    """One linear layer: each encoder frame (D) predicts the ``subsampling`` feature frames (F each) it covers."""

    def __init__(self, feat_in: int, feat_out: int, subsampling: int = 4):
        super().__init__()
        self.feat_out, self.subsampling = int(feat_out), int(subsampling)
        self.proj = nn.Linear(feat_in, feat_out * subsampling)

    @property
    def input_types(self):
        return OrderedDict({"encoder_output": NeuralType(("B", "D", "T"), AcousticEncodedRepresentation())})

    @property
    def output_types(self):
        return OrderedDict({"out": NeuralType(("B", "T", "D"), AcousticEncodedRepresentation())})

    @typecheck()
    def forward(self, encoder_output: torch.Tensor) -> torch.Tensor:
        b, _, t = encoder_output.shape
        y = self.proj(encoder_output.transpose(1, 2))  # (B, T', F * s)
        return y.reshape(b, t * self.subsampling, self.feat_out)  # (B, T' s, F): frame by frame


class MaskedReconstructionLoss(Loss):
    """Mean |x - x̂| over the valid feature frames (all, or ``masked_only``): Tian et al.'s L1 objective."""

    needs_labels = False

    def __init__(self, masked_only: bool = False):
        super().__init__()
        self.masked_only = bool(masked_only)

    @property
    def input_types(self):
        return {"spectrograms": NeuralType(("B", "D", "T"), SpectrogramType()),
                "spec_masks": NeuralType(("B", "D", "T"), SpectrogramType()),
                "decoder_outputs": NeuralType(("B", "T", "D"), AcousticEncodedRepresentation()),
                "decoder_lengths": NeuralType(tuple("B"), LengthsType(), optional=True)}

    @property
    def output_types(self):
        return {"loss": NeuralType(elements_type=LossType())}

    @typecheck()
    def forward(self, spectrograms, spec_masks, decoder_outputs, decoder_lengths=None):
        target = spectrograms.transpose(1, 2)  # (B, T, F)
        t = min(target.shape[1], decoder_outputs.shape[1])
        target, pred = target[:, :t], decoder_outputs[:, :t]
        # NeMo's preprocessor writes exact zeros on padded frames: a valid frame is one with any non-zero feature
        valid = target.abs().sum(dim=2) > 0  # (B, T)
        if self.masked_only:
            valid = valid & (spec_masks.transpose(1, 2)[:, :t].amax(dim=2) > 0)
        err = (pred - target).abs().mean(dim=2)  # (B, T)
        return (err * valid).sum() / valid.sum().clamp_min(1)
