"""Adaptive-dropout gates and the wrappers that apply them (PEFT's idea: the wrapper keeps ``base_layer``, so the
gates can be removed and the layer is the one it was).

A gate holds the logits β′ of ``n`` units (``width`` channels each). In training its mask is H(β + ε) with the
gradient of σ(β + ε) (``_HardSigmoidST``); in eval it is the deterministic 1[β ≥ c∞], which ``prune`` turns into a
physically smaller model with identical outputs. With ``settle_after_k`` training uses that eval mask too once
c(t) has reached c∞ (``GateSchedule.settled``).

Where the masks act, per Conformer layer (the unit map's kinds):

- ``ffn1``/``ffn2``: the input of ``feed_forward{1,2}.linear2`` (hidden units after the activation);
- ``qk``: the outputs of ``linear_k`` and ``linear_pos``. Masking key and position dimension j zeroes
  (q_j + u_j) k_j and (q_j + v_j) p_j, exactly as masking the query after its position biases (Kubo's query mask,
  methods.md §3(d).4), and a pruned j removes the Q, K, linear_pos rows and the pos_bias_u/v entries;
- ``v``: the output of ``linear_v``;
- ``conv``: the input of ``conv.pointwise_conv2``, one gate per GroupNorm group. Not per channel at the GLU output
  as in the paper: with a group-wise norm a channel masked there is not zero downstream (the depthwise bias makes
  it a constant, and it still enters its group's statistics), so removing it would change the model. A whole group
  gated after the norm and Swish contributes exactly zero, and removing it leaves the other groups' statistics
  untouched, so ``prune`` is exact. (Use more GroupNorm groups for a finer conv granularity.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemo_layerfx.encoder.conv import pointwise
from nemo_layerfx.pruning.config import AdaptiveDropoutConfig


class _HardSigmoidST(torch.autograd.Function):
    """Forward: the hard step H(z) exactly; backward: the gradient of σ(z) (Kubo's sigmoid straight-through)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(logits)
        ctx.save_for_backward(sig)
        return (logits > 0).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (sig,) = ctx.saved_tensors
        return grad * sig * (1.0 - sig)


class GateSchedule(nn.Module):
    """What every gate of an encoder shares: the config and the optimizer step (a buffer: saved with the model, so a
    restored model knows its c(t) and prunes at the threshold it was trained to)."""

    def __init__(self, config: AdaptiveDropoutConfig):
        super().__init__()
        self.config = config
        self.register_buffer("step", torch.tensor(-1, dtype=torch.long))  # -1: no optimizer step handed over yet

    def target(self) -> float:
        return self.config.target(max(0, int(self.step)))

    def settled(self) -> bool:
        return self.config.settled(int(self.step))

    def kept(self, beta: torch.Tensor) -> torch.Tensor:
        """The deterministic mask 1[β ≥ c∞] (eval, and training once settled): no gradient reaches β′."""
        return (beta.detach() >= self.config.c_inf).to(beta.dtype)

    def training_mask(self, beta: torch.Tensor) -> torch.Tensor:
        """A training forward's hard mask H(β + ε), ε ~ Logistic(0, 1), with the gradient of σ(β + ε); once settled,
        the eval mask (the kept subnetwork is fine-tuned as it is)."""
        self.check_step()
        if self.settled():
            return self.kept(beta)
        u = torch.rand_like(beta).clamp_(1e-6, 1.0 - 1e-6)
        return _HardSigmoidST.apply(beta + torch.log(u) - torch.log1p(-u))

    def draw(self, gates: list["RetentionGate"]) -> None:
        """One training forward's masks for every gate at once: the same estimator as ``RetentionGate.mask``, in a
        dozen operations for the whole encoder instead of a dozen per gate (the gated step's overhead on a CPU is
        per-operation, not per-unit). Each gate takes its channel mask once (``channel_mask``); ``clear`` drops
        what no module used."""
        if not gates:
            return
        key = tuple((g.n, g.width) for g in gates)
        if self.__dict__.get("_layout", (None,))[0] != key:  # per-unit repeat counts, built once per layout
            repeats = torch.tensor([g.width for g in gates for _ in range(g.n)])
            self.__dict__["_layout"] = (key, repeats, [g.n * g.width for g in gates])
        _, repeats, sizes = self.__dict__["_layout"]
        beta_prime = torch.cat([g.beta_prime for g in gates])
        mask = self.training_mask(self.config.scale * beta_prime + self.target())
        channels = mask.repeat_interleave(repeats.to(mask.device), output_size=sum(sizes))
        for g, m in zip(gates, channels.split(sizes)):
            g.__dict__["_drawn"] = m

    @staticmethod
    def clear(gates: list["RetentionGate"]) -> None:
        """Forget the masks of this forward (no tensor of a step's graph outlives it)."""
        for g in gates:
            g.__dict__.pop("_drawn", None)
            g.__dict__.pop("_kept", None)

    def check_step(self) -> None:
        if int(self.step) < 0:
            raise RuntimeError(
                "the encoder has adaptive_dropout gates but no optimizer step was handed to them: add "
                "{_target_: nemo_layerfx.pruning.AdaptiveDropout} to trainer.callbacks (the shipped "
                "conformer_gn_adaptive_dropout configs do), or set encoder.adaptive_dropout_schedule.step in your loop")


class RetentionGate(nn.Module):
    """Retention logits of ``n`` units: β = √(γ/α)·β′ + c(t), β′ starting at 0 (so β starts at c₀)."""

    def __init__(self, n: int, width: int, schedule: GateSchedule):
        super().__init__()
        self.n, self.width = int(n), int(width)
        self.beta_prime = nn.Parameter(torch.zeros(self.n))
        object.__setattr__(self, "schedule", schedule)  # shared, registered once on the encoder

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.beta_prime.zero_()

    def beta(self) -> torch.Tensor:
        return self.schedule.config.scale * self.beta_prime + self.schedule.target()

    def mask(self) -> torch.Tensor:
        """(n,) hard 0/1: sampled in training (gradient of σ(β + ε)), 1[β ≥ c∞] in eval (and in training once
        settled)."""
        return self.schedule.training_mask(self.beta()) if self.training else self.schedule.kept(self.beta())

    def channel_mask(self, keep: bool = False) -> torch.Tensor:
        """(n * width,) the mask per channel (a unit's channels are consecutive); ``keep``: remember it for the
        second module the same units gate in this forward (``kept_channel_mask``)."""
        m = self.__dict__.pop("_drawn", None) if self.training else None  # drawn with all gates (GateSchedule.draw)
        if m is None:
            m = self.mask()
            m = m.repeat_interleave(self.width) if self.width > 1 else m
        if keep:
            self.__dict__["_kept"] = m
        return m

    def kept_channel_mask(self) -> torch.Tensor:
        """The mask the last ``channel_mask(keep=True)`` drew, handed out once (a tensor of this step's graph must
        not outlive it); a fresh mask if there is none. So the key and position dimensions of a query/key unit are
        dropped together, one draw per unit and forward, as Kubo's single query mask drops them."""
        m = self.__dict__.pop("_kept", None)
        return self.channel_mask() if m is None else m

    def expected_retention(self) -> torch.Tensor:
        return torch.sigmoid(self.beta())

    def extra_repr(self) -> str:
        return f"units={self.n}, width={self.width}"


class _Gated(nn.Module):
    """What both wrappers share: the wrapped layer's sizes, read from its weight.

    A wrapper masks whichever is smaller, the activations or the weight: a masked input column (or output row) of
    the weight gives the same products, each either kept or exactly zero, and on long utterances the weight is
    the smaller tensor (16 layers, d_model 256, 9-s batches: about 7x fewer elements to mask)."""

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[0]


class GatedInput(_Gated):
    """``base_layer(x * mask)``, the mask along ``dim`` of x (-1 for a Linear's input, 1 for a Conv1d's)."""

    def __init__(self, base_layer: nn.Module, gate: RetentionGate, dim: int = -1):
        super().__init__()
        self.base_layer, self.dim = base_layer, dim
        object.__setattr__(self, "gate", gate)  # registered on the layer's adaptive_dropout dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.gate.channel_mask().to(x.dtype)
        base = self.base_layer
        if type(base) is nn.Conv1d and self.dim == 1 and base.kernel_size == (1,):  # the conv module's pointwise conv
            if x.numel() > base.weight.numel():  # long inputs: mask the weight's input columns (same products)
                return pointwise(x, base.weight * m.view(1, -1, 1), base.bias)
            return pointwise(x * m.view(-1, 1), base.weight, base.bias)
        if type(base) is nn.Linear and self.dim == -1 and x.numel() > base.weight.numel():
            return F.linear(x, base.weight * m, base.bias)
        if self.dim != -1:
            m = m.view(-1, *([1] * (x.dim() - self.dim - 1)))  # e.g. (C, 1) for (B, C, T)
        return base(x * m)


class GatedOutput(_Gated):
    """``base_layer(x) * mask`` along the output features. ``pair``: ``"draw"`` for the first of two modules one
    gate masks in a forward (it keeps its mask), ``"reuse"`` for the second (it applies that same mask)."""

    def __init__(self, base_layer: nn.Module, gate: RetentionGate, pair: str | None = None):
        super().__init__()
        self.base_layer, self.pair = base_layer, pair
        object.__setattr__(self, "gate", gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.gate.kept_channel_mask() if self.pair == "reuse" else self.gate.channel_mask(self.pair == "draw")
        base = self.base_layer
        if type(base) is nn.Linear and x.numel() > base.weight.numel():  # long inputs: mask the weight's rows
            m = m.to(base.weight.dtype)
            return F.linear(x, base.weight * m.unsqueeze(1), None if base.bias is None else base.bias * m)
        y = base(x)
        return y * m.to(y.dtype)
