"""Small megatron-core modules the plain (non Transformer Engine) layer spec lacks.

megatron-core 0.16.1's multi-latent attention hands its core attention different head sizes
for keys (``k_channels``) and values (``v_channels``); only Transformer Engine's attention
accepts them. ``LatentCoreAttention`` is that core attention in plain PyTorch, selected by the
model builder for MLA models when Transformer Engine is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bridgegen.bridge.errors import ConfigError


class LatentCoreAttention(torch.nn.Module):
    """Causal softmax attention with separate query/key and value head sizes.

    Takes megatron-core's core-attention arguments: query/key ``[sq, b, heads, k_channels]``,
    value ``[sk, b, heads, v_channels]``; returns ``[sq, b, heads * v_channels]``.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.k_channels = k_channels
        self.v_channels = v_channels

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        packed_seq_params: Any = None,
        **unused: Any,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need Transformer Engine's attention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        scale = self.softmax_scale if self.softmax_scale is not None else q.shape[-1] ** -0.5
        if attention_mask is None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:  # megatron masks are True where attention is not allowed
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, scale=scale
            )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def use_latent_core_attention(block_spec: Any, q_lora: bool = True) -> None:
    """Swap the plain spec's core attention for LatentCoreAttention in every MLA layer, and
    drop the q norm when queries have no LoRA (it has nothing to norm; megatron-core 0.19
    refuses a q norm it would not use).

    Without Transformer Engine, megatron-core 0.16.1 stands a mock in for it, which the MLA
    module takes for the real thing (``HAVE_TE`` is true); tell it the truth first.
    """
    import megatron.core.extensions.transformer_engine as te_extension
    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.transformer.identity_op import IdentityOp

    if not getattr(te_extension, "HAVE_TE", True):
        mla.HAVE_TE = False
    for layer_spec in block_spec.layer_specs:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if submodules is not None and hasattr(submodules, "linear_kv_down_proj"):
            submodules.core_attention = LatentCoreAttention
            if not q_lora:
                submodules.q_layernorm = IdentityOp
                submodules.linear_q_proj = _plain_q_projection()


_PLAIN_Q: dict[str, Any] = {}


def _plain_q_projection() -> Any:
    """The query projection of MLA without q LoRA: a plain column-parallel linear.

    megatron-core 0.19 (``mla_qk_norm_config``) insists that, with ``qk_layernorm``, a model
    without q LoRA project queries through a fused norm + linear, and the plain backend has none,
    so it refuses to build DeepSeek-V2-Lite or Moonlight. Their queries have no norm (HF applies
    none). This subclass is offered as the "fused" class and is a plain linear, which builds the
    model HF describes; megatron-core 0.16 never asks.
    """
    if "class" not in _PLAIN_Q:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        class PlainQueryProjection(ColumnParallelLinear):  # type: ignore[misc]
            """Column-parallel linear, with no norm, for MLA queries without LoRA."""

        _PLAIN_Q["class"] = PlainQueryProjection
        try:
            import megatron.core.transformer.multi_latent_attention as mla

            resolver = mla.QKNormConfigResolver
        except AttributeError:
            return PlainQueryProjection

        class PlainQueryResolver(resolver):  # type: ignore[misc,valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                if getattr(self, "fused_norm_linear_impl", None) is None:
                    self.fused_norm_linear_impl = PlainQueryProjection

        mla.QKNormConfigResolver = PlainQueryResolver
    return _PLAIN_Q["class"]


class PlainRMSNorm(torch.nn.Module):
    """RMSNorm scaling by ``offset + w``, computed in fp32 and scaled before the cast back, as
    Gemma's and OLMo 2's are. Holding ``w`` as HF stores it keeps checkpoints bit-exact in every
    dtype."""

    offset = 0.0
    normalization = "RMSNorm"

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **unused: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (self.offset + self.weight.float())).type_as(x)


class ZeroCenteredRMSNorm(PlainRMSNorm):
    """RMSNorm whose weight ``w`` scales by ``1 + w`` (megatron-core's zero-centred gamma), for
    the plain spec (whose torch norm refuses the option)."""

    offset = 1.0


class ZeroCenteredLayerNorm(torch.nn.Module):
    """LayerNorm scaling by ``1 + w`` and adding its bias (megatron-core's zero-centred gamma
    with ``normalization: LayerNorm``; Nemotron's LayerNorm1P), computed in the input's dtype
    as transformers computes it, for the plain spec (whose torch norm refuses the option)."""

    normalization = "LayerNorm"

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight + 1, self.bias, self.eps)


def zero_centered_norm(normalization: str) -> type[torch.nn.Module]:
    """The zero-centred (1 + w) norm of the plain spec for megatron-core's ``normalization``."""
    norms: dict[str, type[torch.nn.Module]] = {"RMSNorm": ZeroCenteredRMSNorm, "LayerNorm": ZeroCenteredLayerNorm}
    if normalization not in norms:
        raise ConfigError(f"layernorm_zero_centered_gamma with normalization {normalization!r} is not supported")
    return norms[normalization]


def use_zero_centered_norms(block_spec: Any, normalization: str) -> None:
    """Every norm of the block (layer norms, q/k norms, final norm) zero-centred, of the kind
    ``normalization`` names."""
    norm = zero_centered_norm(normalization)
    norm_slots = ("input_layernorm", "pre_mlp_layernorm")
    for layer_spec in block_spec.layer_specs:
        for slot in norm_slots:
            if _is_norm(getattr(layer_spec.submodules, slot, None)):
                setattr(layer_spec.submodules, slot, norm)
        attention = getattr(getattr(layer_spec.submodules, "self_attention", None), "submodules", None)
        for slot in ("q_layernorm", "k_layernorm"):
            if attention is not None and _is_norm(getattr(attention, slot, None)):
                setattr(attention, slot, norm)
    block_spec.layer_norm = norm


def built_normalization(module: torch.nn.Module) -> str | None:
    """"RMSNorm" or "LayerNorm" for a norm module megatron-core or this runtime builds, None for
    any other module."""
    declared = getattr(type(module), "normalization", None)
    if isinstance(declared, str):
        return declared
    if isinstance(module, torch.nn.RMSNorm):
        return "RMSNorm"
    if isinstance(module, torch.nn.LayerNorm):
        return "LayerNorm"
    return None


def _is_norm(module: Any) -> bool:
    name = getattr(module, "__name__", "") or getattr(getattr(module, "module", None), "__name__", "")
    return "Norm" in name


def scale_embeddings(model: torch.nn.Module, scale: float) -> None:
    """Multiply the embedding output by ``scale`` (Gemma's sqrt(hidden_size)), in the
    activations' dtype as HF does."""
    embedding = getattr(model, "embedding", None)
    if embedding is None:
        return

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * torch.tensor(scale, dtype=output.dtype)

    embedding.register_forward_hook(hook)


class _Softcapped(torch.nn.Module):
    """Wraps megatron-core's masked softmax: cap the scores first."""

    def __init__(self, softmax: torch.nn.Module, cap: float) -> None:
        super().__init__()
        self.softmax = softmax
        self.cap = cap

    def forward(self, scores: torch.Tensor, *rest: Any) -> torch.Tensor:
        capped: torch.Tensor = self.softmax(torch.tanh(scores / self.cap) * self.cap, *rest)
        return capped


def softcapped_attention(cap: float) -> type[torch.nn.Module]:
    """megatron-core's plain DotProductAttention with attention-logit softcapping (Gemma 2):
    scores become ``cap * tanh(scores / cap)`` after scaling, before the mask and softmax."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SoftcappedDotProductAttention(DotProductAttention):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.scale_mask_softmax = _Softcapped(self.scale_mask_softmax, cap)  # type: ignore[has-type]

    return SoftcappedDotProductAttention


def use_softcapped_attention(block_spec: Any, cap: float) -> None:
    attention_class = softcapped_attention(cap)
    for layer_spec in block_spec.layer_specs:
        submodules = getattr(getattr(layer_spec.submodules, "self_attention", None), "submodules", None)
        if submodules is not None and hasattr(submodules, "core_attention"):
            submodules.core_attention = attention_class


def _changed_output(change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A forward hook on a megatron-core layer returning ``(output, bias)``: ``change`` of the
    output with its bias added (None: the output layer's and many a linear layer's)."""

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        hidden, bias = output
        if bias is not None:
            hidden = hidden + bias
        return change(hidden), None

    return hook


def _change_logits(model: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    output_layer = getattr(model, "output_layer", None)
    if output_layer is not None:
        output_layer.register_forward_hook(_changed_output(change))


def _change_sublayer_outputs(
    layer: Any,
    attention: Callable[[torch.Tensor], torch.Tensor],
    mlp: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """``attention`` / ``mlp`` applied to a decoder layer's attention / MLP output, before the
    residual add."""
    layer.self_attention.register_forward_hook(_changed_output(attention))
    layer.mlp.register_forward_hook(_changed_output(mlp))


def softcap_final_logits(model: torch.nn.Module, cap: float) -> None:
    """Gemma 2's final-logit softcapping on the output layer."""
    _change_logits(model, lambda logits: torch.tanh(logits / cap) * cap)


def add_post_layer_norms(model: torch.nn.Module) -> None:
    """Gemma 2 / 3 and OLMo 2 norm the attention and MLP outputs before the residual add: each
    layer gets ``post_self_attn_layernorm`` and ``post_mlp_layernorm``, zero-centred (1 + w,
    Gemma) when the model's norms are, plain (w, OLMo 2) otherwise."""
    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        config = layer.config
        if config.normalization != "RMSNorm":
            raise ConfigError(f"post-layer norms are RMSNorms; normalization {config.normalization!r} is not supported")
        norm = ZeroCenteredRMSNorm if config.layernorm_zero_centered_gamma else PlainRMSNorm
        layer.post_self_attn_layernorm = norm(config, config.hidden_size, config.layernorm_epsilon)
        layer.post_mlp_layernorm = norm(config, config.hidden_size, config.layernorm_epsilon)
        _change_sublayer_outputs(layer, layer.post_self_attn_layernorm, layer.post_mlp_layernorm)


def use_local_rope_base(model: torch.nn.Module, local_base: float) -> None:
    """Gemma 3: layers with a sliding window rotate with their own RoPE base (no scaling);
    global layers keep the model's rotary embedding."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.utils import is_layer_window_attention

    decoder = getattr(model, "decoder", None)
    layers = list(getattr(decoder, "layers", []))
    if not layers:
        return
    config = layers[0].config
    local = RotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_base=local_base,
        use_cpu_initialization=config.use_cpu_initialization,
    )
    model.local_rotary_pos_emb = local

    def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        rope = kwargs.get("rotary_pos_emb")
        if rope is not None:
            kwargs["rotary_pos_emb"] = local(rope.shape[0]).to(rope.device)
        return args, kwargs

    for layer in layers:
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer.layer_number):
            layer.register_forward_pre_hook(hook, with_kwargs=True)


def use_hf_rope(model: torch.nn.Module, rope: Any, base: float, max_positions: int) -> None:
    """RoPE scalings megatron-core's rotary embedding cannot express, computed as HF does:
    llama3 with any parameters (fixed frequencies), and dynamic NTK (the base grows with the
    sequence once it passes ``max_positions``)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    unscaled = rotary.inv_freq.clone()
    dim = 2 * unscaled.numel()
    if rope.rope_type == "llama3":
        rotary.inv_freq = rotary._apply_scaling(
            unscaled,
            factor=float(rope.param("factor")),
            low_freq_factor=float(rope.param("low_freq_factor")),
            high_freq_factor=float(rope.param("high_freq_factor")),
            original_max_position_embeddings=int(rope.param("original_max_position_embeddings")),
        )
    elif rope.rope_type == "dynamic":
        factor = float(rope.param("factor"))
        original = max_positions  # transformers' dynamic NTK reads max_position_embeddings only

        def hook(module: torch.nn.Module, args: Any) -> None:
            seq_len = max(int(args[0]), original)
            grown = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
            exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            module.inv_freq = (1.0 / grown**exponents).to(unscaled.device)

        rotary.register_forward_pre_hook(hook)


def multiply_residual_branches(model: torch.nn.Module, multiplier: float) -> None:
    """Granite: the attention and MLP outputs (biases included) times ``multiplier`` before
    each residual add."""

    def scaled(hidden: torch.Tensor) -> torch.Tensor:
        return hidden * multiplier

    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        _change_sublayer_outputs(layer, scaled, scaled)


def divide_logits(model: torch.nn.Module, divisor: float) -> None:
    """Granite: the logits divided by ``divisor`` (its ``logits_scaling``)."""
    _change_logits(model, lambda logits: logits / divisor)


def remove_pre_norms(block_spec: Any) -> None:
    """OLMo 2: decoder layers without input and pre-MLP norms (the final norm stays)."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer_spec in block_spec.layer_specs:
        layer_spec.submodules.input_layernorm = IdentityOp
        layer_spec.submodules.pre_mlp_layernorm = IdentityOp


class NormOverHeads(torch.nn.Module):
    """RMSNorm of queries or keys over all heads at once (OLMo 2), not per head.

    megatron-core builds a q/k norm per head (``hidden_size`` is the head size) and hands it
    ``[s, b, heads, head_dim]``; this one holds the weight of its tensor-parallel rank's heads
    (``[heads * head_dim]``, split over ranks like the projection) and sums the squares over
    the tensor-parallel group, so every rank normalises by the statistics of the whole
    projection, as HF does.
    """

    heads_field = "num_attention_heads"
    normalization = "RMSNorm"

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **unused: Any) -> None:
        super().__init__()
        heads = getattr(config, self.heads_field) or config.num_attention_heads
        ranks = config.tensor_model_parallel_size
        if heads % ranks:
            raise ConfigError(
                f"q/k norm over all heads: {self.heads_field} {heads} does not split over tensor "
                f"parallel size {ranks} (each rank normalises whole heads)"
            )
        self.eps = eps
        self.ranks = ranks
        self.total_width = heads * hidden_size
        self.weight = torch.nn.Parameter(torch.empty(heads // ranks * hidden_size, dtype=config.params_dtype))
        # What megatron-core's tensor-parallel layers set on a weight split along dim 0.
        self.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
        self.weight.partition_dim = 0  # type: ignore[attr-defined]
        self.weight.partition_stride = 1  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], -1).float()
        squares = flat.pow(2).sum(-1, keepdim=True)
        if self.ranks > 1:  # all-reduce both ways: every rank's output depends on every rank's heads
            from megatron.core import parallel_state
            from torch.distributed.nn.functional import all_reduce

            squares = all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())  # type: ignore[no-untyped-call]
        normed = flat * torch.rsqrt(squares / self.total_width + self.eps)
        return (self.weight * normed).to(x.dtype).reshape(x.shape)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (), metadata: Any = None
    ) -> Any:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets)


class KeyNormOverHeads(NormOverHeads):
    """NormOverHeads for keys: one weight slice per key/value head."""

    heads_field = "num_query_groups"


def use_qk_norms_over_heads(block_spec: Any) -> None:
    """OLMo 2: q/k norms over the whole projection (NormOverHeads) in every layer."""
    for layer_spec in block_spec.layer_specs:
        attention = getattr(getattr(layer_spec.submodules, "self_attention", None), "submodules", None)
        if attention is not None and _is_norm(getattr(attention, "q_layernorm", None)):
            attention.q_layernorm = NormOverHeads
            attention.k_layernorm = KeyNormOverHeads


# The built-in runtime modules' implementations, as their parameter classes name them
# (``bridgegen.bridge.module_parameters``): each takes the layer spec or the model, and the
# module's parameters.


def use_softcapped_attention_module(block_spec: Any, p: Any) -> None:
    use_softcapped_attention(block_spec, p.cap)


def remove_pre_norms_module(block_spec: Any, p: Any) -> None:
    remove_pre_norms(block_spec)


def use_qk_norms_over_heads_module(block_spec: Any, p: Any) -> None:
    use_qk_norms_over_heads(block_spec)


def scale_embeddings_module(model: torch.nn.Module, p: Any) -> None:
    scale_embeddings(model, p.scale)


def softcap_final_logits_module(model: torch.nn.Module, p: Any) -> None:
    softcap_final_logits(model, p.cap)


def add_post_layer_norms_module(model: torch.nn.Module, p: Any) -> None:
    add_post_layer_norms(model)


def use_local_rope_base_module(model: torch.nn.Module, p: Any) -> None:
    use_local_rope_base(model, p.base)


def multiply_residual_branches_module(model: torch.nn.Module, p: Any) -> None:
    multiply_residual_branches(model, p.multiplier)


def divide_logits_module(model: torch.nn.Module, p: Any) -> None:
    divide_logits(model, p.divisor)
