"""NeMo's masked convolutional front end without its redundant passes (bit-identical outputs and gradients).

NeMo's ``ConvSubsampling`` runs its 2-D convolutions and activations in a ``MaskedConvSequential``, which zeroes the
padded frames before every layer and once more at the end, each time into a new (B, C, T, F) tensor: the largest
activations of the whole encoder (64 channels at a quarter or half the frame rate). ``GroupNormConformerEncoder``
gives its front end ``LeanMaskedConvSequential`` instead.

Shape notation: B batch, C channels, T frames, F frequency bins.
"""

from __future__ import annotations

import torch
from nemo.collections.asr.parts.submodules.subsampling import MaskedConvSequential, calculate_conv_output_size
from torch import nn

# Layers that map 0 to 0 elementwise: a mask applied before one still holds after it.
ZERO_PRESERVING = (nn.ReLU,)


class LeanMaskedConvSequential(MaskedConvSequential):
    """The same layers and numbers as NeMo's ``MaskedConvSequential``, with fewer passes over the activations.

    - A mask applied just before a ReLU still holds after it (ReLU(0) = 0), so the mask NeMo applies again before
      the next layer (and at the end, after a ReLU) changes nothing and is skipped.
    - The other masks multiply in place the tensor a convolution just produced (a convolution's backward does not
      need its output), or, without gradients, any tensor this forward produced; never the caller's input.

    No state of its own: checkpoints and NeMo's ``isinstance`` checks are unchanged.
    """

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, F) features; lengths: (B,). Returns (B, C, T', F') and the lengths after striding."""
        x = x.unsqueeze(1)  # (B, 1, T, F)
        current = lengths.clone().float()
        mask = self._create_mask(x, current.long()).unsqueeze(1)  # (B, 1, T, F), 1.0 on valid frames
        masked, owned = False, False  # x is zero on padded frames already / x may be overwritten
        for layer in self:
            if not masked:
                x = x.mul_(mask) if owned else x * mask
            x = layer(x)
            masked = isinstance(layer, ZERO_PRESERVING)  # x was masked before it, and it keeps the zeros
            owned = isinstance(layer, nn.Conv2d) or not torch.is_grad_enabled()
            if hasattr(layer, "stride") and layer.stride != (1, 1):
                causal = hasattr(layer, "_left_padding")  # NeMo's CausalConv2D
                padding = (layer._left_padding, layer._right_padding) if causal else layer.padding
                current = calculate_conv_output_size(current, layer.kernel_size[0], layer.stride[0], padding)
                mask = self._create_mask(x, current.long()).unsqueeze(1)
                masked = False
        if not masked:
            x = x.mul_(mask) if owned else x * mask
        return x, current.long()
