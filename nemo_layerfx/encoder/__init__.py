"""GroupNorm Conformer encoder whose normalization ignores padded frames.

NeMo's ``conv_norm_type: group_normG`` normalizes the conv module over the whole padded time axis, so an
utterance's encoding depends on how much padding its batch has (0.3-0.7 abs drift at 200-600 padded frames).
Here the GroupNorm statistics come from valid frames only.

Shape notation: B batch, T frames (after subsampling), D d_model, C conv channels, G groups, H heads, d_k = D / H.

The module keeps NeMo's parameter names and shapes (``layers.i.conv.batch_norm.{weight,bias}`` is the GroupNorm),
so a checkpoint trained with NeMo's ``group_normG`` loads with ``strict=True`` and ours loads into stock NeMo by
swapping ``_target_`` back to ``nemo.collections.asr.modules.ConformerEncoder``.

Per-layer widths (``ff_hidden``, ``layer_n_heads``, ``conv_channels``) let one config describe the smaller
dense models that federated dropout, pruning and low-rank training produce; ``d_model`` is the same everywhere.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from nemo.collections.asr.modules.conformer_encoder import (
    ConformerEncoder,
    ConformerEncoderAdapter,
)
from nemo.collections.asr.parts.submodules.conformer_modules import ConformerFeedForward
from nemo.collections.asr.parts.submodules.multi_head_attention import (
    MultiHeadAttention,
    RelPositionMultiHeadAttention,
)
from nemo.collections.asr.parts.submodules.subsampling import MaskedConvSequential
from torch import nn

from nemo_layerfx.encoder.attention import LeanRelPositionMultiHeadAttention, RaggedMultiHeadAttention
from nemo_layerfx.encoder.conv import STOCK_ENCODER_TARGET, MaskedConformerConvolution, parse_num_groups
from nemo_layerfx.encoder.layer import lean_layer_
from nemo_layerfx.encoder.subsampling import LeanMaskedConvSequential
from nemo_layerfx.options import encoder_option

ENCODER_TARGET = "nemo_layerfx.encoder.GroupNormConformerEncoder"
# Keys our encoder adds to NeMo's signature; stock NeMo rejects them, so they are dropped when exporting.
LAYERFX_ONLY_KEYS = ("ff_hidden", "layer_n_heads", "conv_channels", "conv_groups", "layer_qk_dims", "layer_v_dims",
                     "share_layers", "inference_depth")
LAYERFX_FLAGS = {"macaron_ffn": True}  # keys stock NeMo lacks, harmless at their default
# conv norms of NeMo's pretrained Conformers that our encoder keeps as NeMo builds them (an adopted model computes
# what it did; group_norm<G> is ours, padding-exact: NeMo's padded group_norm goes through `layerfx convert-norm`)
KEPT_NORMS = ("batch_norm", "layer_norm", "instance_norm", "fused_batch_norm")


class EncoderExtension:
    """How a capability takes part in ``GroupNormConformerEncoder``'s forward without the core knowing it.

    An encoder option attaches one with ``encoder.add_extension(name, ext)`` (e.g. ``depth_sampling`` a depth
    sampler, ``adaptive_dropout`` the gates' mask draws). In a training forward the first extension that returns a
    depth sets how many layers run; every forward calls ``before_forward`` first and ``after_forward`` at the end
    (also when the forward fails), in the order the extensions were added. Override what you need.
    """

    def training_depth(self, encoder: nn.Module) -> int | None:
        return None

    def before_forward(self, encoder: nn.Module) -> None:
        pass

    def after_forward(self, encoder: nn.Module) -> None:
        pass


def layer_sets(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's distinct layer modules in order of first use (a layer shared by several depths once)."""
    seen: dict[int, nn.Module] = {}
    for layer in encoder.layers:
        seen.setdefault(id(layer), layer)
    return list(seen.values())


def _per_layer(name: str, values: Sequence[Any] | None, n_layers: int) -> list[Any] | None:
    if values is None:
        return None
    values = list(values)
    if len(values) != n_layers:
        raise ValueError(f"{name} has {len(values)} entries but the encoder has n_layers={n_layers}")
    return values


def _ff_pair(value: Any) -> tuple[int, int]:
    """One ``ff_hidden`` entry: an int (both FFNs) or a pair [ffn1, ffn2]."""
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 0 or max(pair) < 1:
        raise ValueError(f"ff_hidden entries must be a positive int or [ffn1, ffn2] (0 removes that FFN's hidden "
                         f"layer, e.g. [0, 576] for Kubo's NoMacaron), got {value!r}")
    return pair


def _shrink_heads(attn: MultiHeadAttention, n_heads: int) -> None:
    """Rebuild ``attn``'s projections for ``n_heads`` heads of the same d_k (NeMo reshapes by h * d_k)."""
    d_model, inner = attn.linear_q.in_features, n_heads * attn.d_k
    bias = attn.linear_q.bias is not None
    attn.h = n_heads
    attn.linear_q = nn.Linear(d_model, inner, bias=bias)
    attn.linear_k = nn.Linear(d_model, inner, bias=bias)
    attn.linear_v = nn.Linear(d_model, inner, bias=bias)
    attn.linear_out = nn.Linear(inner, d_model, bias=bias)
    if hasattr(attn, "linear_pos"):
        attn.linear_pos = nn.Linear(d_model, inner, bias=False)
        attn.pos_bias_u = nn.Parameter(torch.zeros(n_heads, attn.d_k))
        attn.pos_bias_v = nn.Parameter(torch.zeros(n_heads, attn.d_k))


def lean_modules_(encoder: ConformerEncoder) -> None:
    """In place: NeMo's relative-position attention modules become ``LeanRelPositionMultiHeadAttention`` (the shift a
    strided view, the scores computed in place), its masked front end ``LeanMaskedConvSequential`` (no redundant
    masking passes) and its blocks ``LeanConformerLayer`` with ``LeanConformerFeedForward`` (one operator per residual
    update, in place in inference). The same parameters, and in training the same numbers bit for bit, with fewer
    passes over the largest activations; CPU inference takes other layouts (channels-last front end, one attention
    projection), within float rounding. ``GroupNormConformerEncoder`` does this to itself, and it works on NeMo's own
    encoders too."""
    for layer in encoder.layers:
        lean_layer_(layer)
        if type(layer.self_attn) is RelPositionMultiHeadAttention:
            layer.self_attn.__class__ = LeanRelPositionMultiHeadAttention
    front = getattr(encoder.pre_encode, "conv", None)
    if type(front) is MaskedConvSequential:
        front.__class__ = LeanMaskedConvSequential


class GroupNormConformerEncoder(ConformerEncoder):
    """NeMo ``ConformerEncoder`` with a padding-exact GroupNorm conv module and optional per-layer widths.

    Every ``ConformerEncoder`` argument keeps its meaning. ``conv_norm_type``: ``group_norm<G>`` (ours, padding-exact)
    or a pretrained model's own ``batch_norm`` / ``layer_norm`` / ``instance_norm`` / ``fused_batch_norm``, kept as
    NeMo builds it (``nemo_layerfx.models.adopt_``), so depth, low rank and sharing apply to NVIDIA's models as they
    are; the conv-unit features (federated dropout, conv gates, per-layer conv widths) need group_norm<G>.

    Args (in addition to NeMo's, all optional; ``None`` means NeMo's uniform width; capability subpackages add
    more keys through ``nemo_layerfx.options``, e.g. ``low_rank`` from ``nemo_layerfx.lowrank``):
        ff_hidden: per layer, the FFN hidden size (int) or ``[ffn1, ffn2]``; NeMo: d_model * ff_expansion_factor.
        layer_n_heads: per layer, the number of attention heads, each of width d_model / n_heads.
        conv_channels: per layer, the conv module's inner channels (a multiple of G); NeMo: d_model.
        conv_groups: per layer, the GroupNorm group count (default G of ``conv_norm_type``). A submodel that drops
            whole groups keeps the group size: ``conv_channels / conv_groups == d_model / G``.
        macaron_ffn: False removes the first (macaron) FFN's hidden layer in every layer (Kubo's NoMacaron).
        layer_qk_dims, layer_v_dims: per layer, a list of per-head query/key and value widths (a pruned layer;
            ``RaggedMultiHeadAttention``, scores still scaled by the original head width d_model / n_heads).
        share_layers: G, the number of distinct parameter sets the ``n_layers`` layers are built from (Tian et al.'s
            PSS / ALBERT at G = 1; consecutive layers share: layer i uses set ``i * G // n_layers``). The sets are
            the module ``layer_sets`` and exist once in the state_dict, the optimizer and the ``.nemo``;
            ``layers`` still lists one entry per depth. None or n_layers: no sharing.
        inference_depth: M, the number of layers an eval-mode forward runs (Tian's shallow-layer inference SLI(M):
            ``transcribe()``, validation and the probe use the first M layers). None: all layers.

    Capabilities take part in the forward through ``EncoderExtension`` (``add_extension``): e.g. a training forward
    runs the depth that ``depth_sampling`` (from ``nemo_layerfx.depth``) draws: only those layers are computed.

    Example::

        enc = GroupNormConformerEncoder(feat_in=80, n_layers=2, d_model=64, n_heads=4,
                                        conv_norm_type="group_norm8", ff_hidden=[256, 128])
    """

    def __init__(
        self,
        *args: Any,
        conv_norm_type: str = "group_norm8",
        ff_hidden: Sequence[Any] | None = None,
        layer_n_heads: Sequence[int] | None = None,
        conv_channels: Sequence[int] | None = None,
        conv_groups: Sequence[int] | None = None,
        layer_qk_dims: Sequence[Sequence[int]] | None = None,
        layer_v_dims: Sequence[Sequence[int]] | None = None,
        macaron_ffn: bool = True,
        share_layers: int | None = None,
        inference_depth: int | None = None,
        **kwargs: Any,
    ):
        # a pretrained model's own norm (batch_norm, layer_norm, ...) keeps NeMo's conv module: adopted, not converted
        own_norm = str(conv_norm_type) in KEPT_NORMS
        num_groups = None if own_norm else parse_num_groups(conv_norm_type)
        options = {k: kwargs.pop(k) for k in list(kwargs) if encoder_option(k) is not None}
        # NeMo's own GroupNorm is built first and replaced below; it needs G | d_model, so give it 1 group.
        super().__init__(*args, conv_norm_type=conv_norm_type if own_norm else "group_norm1", **kwargs)
        self.conv_norm_type = conv_norm_type
        self.num_groups = num_groups
        if own_norm and (conv_channels is not None or conv_groups is not None):
            raise ValueError(f"conv_channels / conv_groups need a group_norm<G> conv norm, not {conv_norm_type!r} "
                             "(conv units are GroupNorm groups)")
        n = len(self.layers)
        ff_hidden = _per_layer("ff_hidden", ff_hidden, n)
        if not macaron_ffn:  # Kubo's NoMacaron baseline: no first FFN (0 hidden units), the second unchanged
            d_ff = self.d_model * kwargs.get("ff_expansion_factor", 4)
            ff_hidden = [[0, _ff_pair(f)[1]] for f in ff_hidden] if ff_hidden is not None else [[0, d_ff]] * n
        layer_n_heads = _per_layer("layer_n_heads", layer_n_heads, n)
        conv_channels = _per_layer("conv_channels", conv_channels, n)
        conv_groups = _per_layer("conv_groups", conv_groups, n)
        layer_qk_dims = _per_layer("layer_qk_dims", layer_qk_dims, n)
        layer_v_dims = _per_layer("layer_v_dims", layer_v_dims, n)
        if (layer_qk_dims is None) != (layer_v_dims is None):
            raise ValueError("layer_qk_dims and layer_v_dims go together (per-head query/key and value widths)")
        use_bias = kwargs.get("use_bias", True)
        kernel = kwargs.get("conv_kernel_size", 31)
        dropout = kwargs.get("dropout", 0.1)
        if layer_n_heads is not None:
            if self.self_attention_model not in ("rel_pos", "abs_pos"):
                raise ValueError(f"layer_n_heads needs self_attention_model rel_pos or abs_pos, "
                                 f"not {self.self_attention_model!r}")
            if self.self_attention_model == "rel_pos" and not kwargs.get("untie_biases", True):
                raise ValueError("layer_n_heads needs untie_biases=True (tied pos_bias_u/v have one head count)")
        for i, layer in enumerate(self.layers):
            if not own_norm:
                layer.conv = MaskedConformerConvolution(
                    d_model=self.d_model,
                    kernel_size=kernel,
                    num_groups=num_groups if conv_groups is None else int(conv_groups[i]),
                    channels=None if conv_channels is None else int(conv_channels[i]),
                    conv_context_size=self.conv_context_size,
                    use_bias=use_bias,
                )
            if ff_hidden is not None:
                ff1, ff2 = _ff_pair(ff_hidden[i])
                layer.feed_forward1 = ConformerFeedForward(self.d_model, ff1, dropout, use_bias=use_bias)
                layer.feed_forward2 = ConformerFeedForward(self.d_model, ff2, dropout, use_bias=use_bias)
            if layer_n_heads is not None and int(layer_n_heads[i]) != layer.self_attn.h:
                if int(layer_n_heads[i]) < 1:
                    raise ValueError(f"layer_n_heads[{i}] must be >= 1, got {layer_n_heads[i]}")
                _shrink_heads(layer.self_attn, int(layer_n_heads[i]))
                layer.n_heads = int(layer_n_heads[i])
            if layer_qk_dims is not None:
                if self.self_attention_model not in ("rel_pos", "abs_pos"):
                    raise ValueError(f"layer_qk_dims needs self_attention_model rel_pos or abs_pos, "
                                     f"not {self.self_attention_model!r}")
                layer.self_attn = RaggedMultiHeadAttention(
                    self.d_model, list(layer_qk_dims[i]), list(layer_v_dims[i]), head_dim=layer.self_attn.d_k,
                    dropout_rate=kwargs.get("dropout_att", 0.0), rel_pos=self.self_attention_model == "rel_pos",
                    use_bias=use_bias)
        lean_modules_(self)
        self._extensions: dict[str, EncoderExtension] = {}
        self.share_layers = None
        if share_layers is not None:
            self.share_(int(share_layers))
        self.set_inference_depth(inference_depth)
        for option in sorted((encoder_option(k) for k in options), key=lambda o: o.order):
            if options[option.name] is not None:
                option.apply(self, options[option.name])

    # --- extensions: how capabilities take part in the forward ------------------------------------------------
    def add_extension(self, name: str, extension: EncoderExtension) -> None:
        """Attach ``extension`` under ``name`` (one per name)."""
        if name in self._extensions:
            raise ValueError(f"the encoder already has a {name!r} extension")
        self._extensions[name] = extension

    def extension(self, name: str) -> EncoderExtension | None:
        """The extension attached under ``name``, or None."""
        return self._extensions.get(name)

    def remove_extension(self, name: str) -> None:
        self._extensions.pop(name, None)

    # --- depth: parameter sets, and how many layers a forward runs --------------------------------------------
    def share_(self, groups: int) -> None:
        """In place: the ``n_layers`` layers use ``groups`` parameter sets, consecutive layers sharing (layer i
        uses the set of layer ``i * groups // n_layers``'s first user); the other layers' parameters are dropped."""
        if self.share_layers is not None:
            raise ValueError(f"the encoder already shares parameters (share_layers={self.share_layers})")
        n = len(self.layers)
        if not 1 <= groups <= n:
            raise ValueError(f"share_layers={groups} must be in 1..n_layers={n} (1: one parameter set used by every "
                             f"layer, Tian's PSS; {n}: no sharing)")
        if groups == n:
            return
        index = [i * groups // n for i in range(n)]  # layer i uses set index[i]: consecutive layers share
        sets = [self.layers[index.index(g)] for g in range(groups)]
        for i, layer in enumerate(self.layers):
            own = {k: v.shape for k, v in layer.state_dict().items()}
            ref = {k: v.shape for k, v in sets[index[i]].state_dict().items()}
            if own != ref:
                raise ValueError(f"share_layers={groups}: layers.{i} has other widths than the layer it shares "
                                 f"parameters with (per-layer widths must agree within a shared set)")
        del self._modules["layers"]
        self.layer_sets = nn.ModuleList(sets)  # the parameters, once
        # One entry per depth, as NeMo's forward iterates them; not registered as a child module, so parameters(),
        # state_dict() and the optimizer see every set once.
        object.__setattr__(self, "layers", nn.ModuleList([sets[g] for g in index]))
        self.share_layers = groups

    def unshare_(self) -> None:
        """In place: every depth gets its own copy of the parameter set it used (the outputs are unchanged)."""
        if self.share_layers is None:
            raise ValueError("nothing to unshare: the encoder's layers do not share parameters (share_layers is not "
                             "set)")
        layers = nn.ModuleList([copy.deepcopy(layer) for layer in self.layers])
        del self._modules["layer_sets"]
        del self.__dict__["layers"]
        self.layers = layers
        self.share_layers = None

    def set_inference_depth(self, depth: int | None) -> None:
        """Run only the first ``depth`` layers in eval mode (None: all). The model's config is not changed; use
        ``nemo_layerfx.depth.set_inference_depth(model, depth)`` to also export it with the ``.nemo``."""
        n = len(self.layers)
        if depth is not None and not 1 <= int(depth) <= n:
            raise ValueError(f"inference_depth={depth} must be in 1..n_layers={n} (or null for all layers)")
        self.inference_depth = None if depth is None else int(depth)

    def active_depth(self) -> int:
        """How many layers the next forward runs: the sampled depth in training, the inference depth in eval."""
        if self.training:
            for extension in self._extensions.values():
                depth = extension.training_depth(self)
                if depth is not None:
                    return int(depth)
        if not self.training and self.inference_depth is not None:
            return self.inference_depth
        return len(self.layers)

    def forward_internal(self, audio_signal, length, cache_last_channel=None, *args, **kwargs):
        if cache_last_channel is not None:
            raise NotImplementedError(
                "GroupNormConformerEncoder does not support cache-aware streaming (cache_last_channel was given): "
                "utterance-level GroupNorm statistics cannot be computed chunk by chunk."
            )
        depth = self.active_depth()
        extensions = list(self._extensions.values())
        # NeMo's forward zips layer_drop_probs with the layers, so a shorter list runs (only) the first `depth`.
        full = self.layer_drop_probs
        self.layer_drop_probs = full[:depth]
        try:
            for extension in extensions:
                extension.before_forward(self)
            return super().forward_internal(audio_signal, length, cache_last_channel, *args, **kwargs)
        finally:
            self.layer_drop_probs = full
            for extension in extensions:
                extension.after_forward(self)

    def get_initial_cache_state(self, *args, **kwargs):
        raise NotImplementedError(
            "GroupNormConformerEncoder does not support cache-aware streaming: utterance-level GroupNorm "
            "statistics cannot be computed chunk by chunk. Use offline (full-utterance) transcription."
        )

    def change_attention_model(self, *args, **kwargs):
        if self.share_layers is not None:
            raise NotImplementedError("change_attention_model is not supported with share_layers; unshare first")
        if any(layer.self_attn.h != self.layers[0].self_attn.h for layer in self.layers):
            raise NotImplementedError("change_attention_model is not supported with per-layer head counts")
        out = super().change_attention_model(*args, **kwargs)
        lean_modules_(self)
        return out


def stock_encoder_config(encoder_cfg: Any) -> dict:
    """Encoder config for NeMo's own ``ConformerEncoder`` (same weights; NeMo's padding-dependent GroupNorm).

    Fails when the config uses what stock NeMo cannot express: per-layer widths, shared layers, an inference depth
    or a capability option such as ``low_rank``; drops training-only options such as ``depth_sampling``.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(encoder_cfg, resolve=True) if not isinstance(encoder_cfg, dict) else dict(encoder_cfg)
    for key, default in LAYERFX_FLAGS.items():
        if cfg.pop(key, default) != default:
            raise ValueError(f"encoder uses {key}={not default}, which stock NeMo ConformerEncoder cannot express")
    for key in LAYERFX_ONLY_KEYS:
        if cfg.pop(key, None) is not None:
            raise ValueError(f"encoder uses {key}, which stock NeMo ConformerEncoder cannot express"
                             + (" (run `layerfx unshare` first)" if key == "share_layers" else ""))
    for key, option in [(k, encoder_option(k)) for k in cfg]:
        if option is None or cfg.pop(key) is None:
            continue
        if not option.training_only:
            raise ValueError(f"encoder uses the nemo_layerfx option {key!r}, which stock NeMo ConformerEncoder cannot "
                             f"build; undo it first (e.g. `layerfx merge` for low_rank)")
        from nemo.utils import logging

        logging.warning(f"stock_encoder_config: dropped the training-only option {key!r} (stock NeMo trains at "
                        f"full depth); the weights and inference outputs are unchanged")
    cfg["_target_"] = STOCK_ENCODER_TARGET
    return cfg


class GroupNormConformerEncoderAdapter(GroupNormConformerEncoder, ConformerEncoderAdapter):
    """Adapter-capable variant, registered so ``model.add_adapter`` works on GroupNorm encoders."""


def register_adapter() -> None:
    """Register the adapter class with NeMo's adapter registry (idempotent); done when this module loads."""
    from nemo.core.classes.mixins import adapter_mixins

    if adapter_mixins.get_registered_adapter(GroupNormConformerEncoder) is None:
        adapter_mixins.register_adapter(base_class=GroupNormConformerEncoder,
                                        adapter_class=GroupNormConformerEncoderAdapter)


register_adapter()
