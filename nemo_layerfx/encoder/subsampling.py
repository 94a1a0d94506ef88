"""NeMo's masked convolutional front end without its redundant passes (bit-identical outputs and gradients).

NeMo's ``ConvSubsampling`` runs its 2-D convolutions and activations in a ``MaskedConvSequential``, which zeroes the
padded frames before every layer and once more at the end, each time into a new (B, C, T, F) tensor: the largest
activations of the whole encoder (64 channels at a quarter or half the frame rate). ``GroupNormConformerEncoder``
gives its front end ``LeanMaskedConvSequential`` instead.

In CPU inference the front end's convolutions run channels-last (``channels_last_conv``): oneDNN's 2-D convolutions
on (B, C, T, F) tensors are several times slower than on the same tensors stored (B, T, F, C) (CPU, 2 threads, a
batch of eight 9-s utterances, 64 channels: the striding front end 128 ms -> 67 ms, timed ad hoc). The front end is
a fixed cost that pruning the blocks cannot shrink, so it bounds what a pruned model gains
(``benchmarks/prune.py``). The results are the same convolutions summed in another order: within float rounding of
NeMo's (~1e-6 relative), not bit for bit; training keeps NeMo's layout and numbers exactly.

Shape notation: B batch, C channels, T frames, F frequency bins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nemo.collections.asr.parts.submodules.subsampling import MaskedConvSequential, calculate_conv_output_size
from torch import nn

# Layers that map 0 to 0 elementwise: a mask applied before one still holds after it.
ZERO_PRESERVING = (nn.ReLU,)


def channels_last_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for x (B, C_in, T, F), the result (B, C_out, T', F') stored channels-last (module doc).

    A single-channel input (the first layer) becomes one matrix product: its k x k patches are a strided view of
    the padded input (copied once, k² values per output position, against C_out written), times the (k², C_out)
    kernel, which writes the result channels-last directly; oneDNN spends most of that layer's time on layout.
    Any other convolution runs on channels-last copies of its input and weight."""
    weight = conv.weight
    if (conv.in_channels == 1 and conv.groups == 1 and conv.padding_mode == "zeros" and conv.dilation == (1, 1)
            and isinstance(conv.padding, tuple)):
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        xp = F.pad(x, (pw, pw, ph, ph)).contiguous()  # (B, 1, T + 2 ph, F + 2 pw)
        b, _, h, w = xp.shape
        ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
        s = (h * w, h * w, w, 1)  # strides from xp's shape (it is contiguous), which a trace follows
        patches = xp.as_strided((b, ho, wo, kh, kw), (s[0], sh * s[2], sw * s[3], s[2], s[3])).reshape(-1, kh * kw)
        kernel = weight.view(conv.out_channels, kh * kw).t()  # (k², C_out)
        y = patches @ kernel if conv.bias is None else torch.addmm(conv.bias, patches, kernel)
        return y.view(b, ho, wo, conv.out_channels).permute(0, 3, 1, 2)  # (B, C_out, T', F'), channels-last
    cl = torch.channels_last
    return conv._conv_forward(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), conv.bias)


class LeanMaskedConvSequential(MaskedConvSequential):
    """The same layers and numbers as NeMo's ``MaskedConvSequential``, with fewer passes over the activations.

    - A mask applied just before a ReLU still holds after it (ReLU(0) = 0), so the mask NeMo applies again before
      the next layer (and at the end, after a ReLU) changes nothing and is skipped.
    - The other masks multiply in place the tensor a convolution just produced (a convolution's backward does not
      need its output), or, without gradients, any tensor this forward produced; never the caller's input.
    - CPU inference: the convolutions run channels-last (``channels_last_conv``) and ReLU in place.

    No state of its own: checkpoints and NeMo's ``isinstance`` checks are unchanged.
    """

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, F) features; lengths: (B,). Returns (B, C, T', F') and the lengths after striding."""
        x = x.unsqueeze(1)  # (B, 1, T, F)
        current = lengths.clone().float()
        mask = self._create_mask(x, current.long()).unsqueeze(1)  # (B, 1, T, F), 1.0 on valid frames
        masked, owned = False, False  # x is zero on padded frames already / x may be overwritten
        fast = not torch.is_grad_enabled() and x.device.type == "cpu"  # CPU inference: channels-last
        for layer in self:
            if not masked:
                x = x.mul_(mask) if owned else x * mask
            if fast and type(layer) is nn.Conv2d:
                x = channels_last_conv(layer, x)
            elif fast and type(layer) is nn.ReLU:
                x = torch.relu_(x)  # owned: without gradients every tensor after the first layer is this forward's
            else:
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
