"""The runtime modules the built-in specs bring, written as any specs folder writes its own:
importable without torch (the spec checker reads the classes; torch and megatron-core are
imported inside ``apply``), copied into ``generated/`` by ``make generate``.

* Cohere, Cohere 2: ``parallel_attention_mlp``, ``logit_scale``, ``per_head_qk_layernorm``.
* Apertus: ``xielu_activation``.
* ERNIE 4.5 MoE: ``biased_softmax_router`` (top k by softmax + ``e_score_correction_bias``,
  weights from the unbiased softmax; megatron-core adds its expert bias to sigmoid scores only).
* HunYuan V1 dense / MoE: ``qk_norm_after_rope`` (megatron-core norms q/k before RoPE).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from pydantic import StrictBool

from bridgegen.bridge.module_parameters import ModuleParameters, Stage


class ParallelAttentionMlp(ModuleParameters):
    """Parallel decoder layers (Cohere): one input norm feeds attention and MLP, and
    out = x + attn(norm(x)) + mlp(norm(x)).

    megatron-core's TransformerLayer is sequential: its MLP reads pre_mlp_layernorm(x + attn).
    Each layer keeps its input, and its pre-MLP norm reads that input instead of x + attn; the
    MLP output is then added to x + attn, as HF adds (residual + attention) + MLP. The spec
    maps HF's one input_layernorm to both norms (``shares_hf_with``). With Transformer
    Engine's spec the pre-MLP norm is an IdentityOp and the norm sits in linear_fc1: the
    substituted input reaches it all the same.
    """

    name: ClassVar[str] = "parallel_attention_mlp"
    stage: ClassVar[Stage] = "model"
    not_in_megatron_lm: ClassVar[str | None] = (
        "parallel attention / MLP layers: the MLP reads the pre-MLP norm of the layer input, not of input + attention"
    )

    def apply(self, target: Any) -> None:
        decoder = getattr(target, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            _make_parallel(layer)


def _make_parallel(layer: Any) -> None:
    kept: dict[str, Any] = {}

    def keep_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kept["input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def norm_reads_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if "input" not in kept:
            raise RuntimeError(
                "parallel_attention_mlp: the pre-MLP norm ran outside its decoder layer's forward, "
                "so the layer input it must read is unknown"
            )
        return (kept["input"], *args[1:])

    def forget_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        kept.pop("input", None)

    layer.register_forward_pre_hook(keep_input, with_kwargs=True)
    layer.pre_mlp_layernorm.register_forward_pre_hook(norm_reads_input)
    layer.register_forward_hook(forget_input, with_kwargs=True)


class LogitScale(ModuleParameters):
    """Logits multiplied by a constant (Cohere's logit_scale), in the logits' dtype as HF
    multiplies them. The core logits_scaling divides by 1 / logit_scale, which rounds
    differently and does not give logit_scale back on export for about 1 value in 6."""

    name: ClassVar[str] = "logit_scale"
    stage: ClassVar[Stage] = "model"
    not_in_megatron_lm: ClassVar[str | None] = "logits multiplied by {scale}"
    scale: float

    def apply(self, target: Any) -> None:
        output_layer = getattr(target, "output_layer", None)
        if output_layer is None:
            return
        scale = self.scale

        def scaled(module: Any, inputs: Any, output: Any) -> Any:
            logits, bias = output
            if bias is not None:
                logits = logits + bias
            return logits * scale, None

        output_layer.register_forward_hook(scaled)


class PerHeadQkLayerNorm(ModuleParameters):
    """q/k LayerNorm without bias whose weight differs per head (Cohere's use_qk_norm:
    weights [heads, head_dim], each head normalised over head_dim in fp32). megatron-core's
    q/k norm shares one [head_dim] weight over all heads; this one holds its tensor-parallel
    rank's heads, [heads / tp, head_dim], split on dim 0 like the projection."""

    name: ClassVar[str] = "per_head_qk_layernorm"
    stage: ClassVar[Stage] = "layer_spec"
    not_in_megatron_lm: ClassVar[str | None] = (
        "q/k LayerNorm without bias, one weight per head (--qk-layernorm shares one weight over heads)"
    )
    enabled: StrictBool

    def apply(self, target: Any) -> None:
        query_norm, key_norm = _head_norm_classes()
        for layer_spec in target.layer_specs:
            attention = getattr(getattr(layer_spec.submodules, "self_attention", None), "submodules", None)
            if attention is None or not hasattr(attention, "q_layernorm"):
                continue
            attention.q_layernorm = query_norm
            attention.k_layernorm = key_norm


_HEAD_NORMS: dict[str, Any] = {}


def _head_norm_classes() -> tuple[Any, Any]:
    if "query" in _HEAD_NORMS:
        return _HEAD_NORMS["query"], _HEAD_NORMS["key"]
    import torch

    from bridgegen.bridge.errors import ConfigError

    class HeadwiseLayerNorm(torch.nn.Module):
        """Bias-free LayerNorm over head_dim with a weight per query head, computed as
        transformers' CohereLayerNorm computes it (fp32, then cast back)."""

        heads_field = "num_attention_heads"
        normalization = "LayerNorm"

        def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
            super().__init__()
            heads = getattr(config, self.heads_field) or config.num_attention_heads
            ranks = config.tensor_model_parallel_size
            if heads % ranks:
                raise ConfigError(
                    f"per-head q/k norm: {self.heads_field} {heads} does not split over tensor parallel size {ranks}"
                )
            self.eps = eps
            self.weight = torch.nn.Parameter(
                torch.empty(heads // ranks, hidden_size, dtype=config.params_dtype)
            )
            # What megatron-core's tensor-parallel layers set on a weight split along dim 0.
            self.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
            self.weight.partition_dim = 0  # type: ignore[attr-defined]
            self.weight.partition_stride = 1  # type: ignore[attr-defined]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # x: [s, b, heads / tp, head_dim]
            dtype = x.dtype
            h = x.to(torch.float32)
            mean = h.mean(-1, keepdim=True)
            variance = (h - mean).pow(2).mean(-1, keepdim=True)
            h = (h - mean) * torch.rsqrt(variance + self.eps)
            return (self.weight.to(torch.float32) * h).to(dtype)

        def sharded_state_dict(
            self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (), metadata: Any = None
        ) -> Any:
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            state_dict = self.state_dict(prefix="", keep_vars=True)
            return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets)

    class KeyHeadwiseLayerNorm(HeadwiseLayerNorm):
        """HeadwiseLayerNorm for keys: one weight row per key/value head."""

        heads_field = "num_query_groups"

    _HEAD_NORMS["query"], _HEAD_NORMS["key"] = HeadwiseLayerNorm, KeyHeadwiseLayerNorm
    return HeadwiseLayerNorm, KeyHeadwiseLayerNorm


_XIELU: dict[str, Any] = {}


def _xielu_class() -> Any:
    """The XIELU module class (made once, on first use, so that torch is imported only then)."""
    if "class" in _XIELU:
        return _XIELU["class"]
    import torch

    class XIELU(torch.nn.Module):
        """xIELU as transformers' ``XIELUActivation._xielu_python`` computes it:

        ``x > 0``:  ``softplus(alpha_p) * x * x + beta * x``
        else:      ``(expm1(min(x, eps)) - x) * (beta + softplus(alpha_n)) + beta * x``

        in the same operations and order, so fp32 results are bit-identical. ``alpha_p`` and
        ``alpha_n`` are trained; ``beta`` and ``eps`` are buffers in transformers, held here as
        frozen parameters (``requires_grad=False``) so that a conversion fills and saves them
        (bridgegen maps parameters, not buffers). All four are whole on every tensor-parallel
        rank (elementwise over that rank's slice of the intermediate activations); in training
        the gradients of ``alpha_p`` / ``alpha_n`` are partial sums over the rank's slice, so
        they pass through megatron-core's copy-to-tensor-parallel region (identity forward,
        all-reduce backward).
        """

        def __init__(self, config: Any) -> None:
            super().__init__()
            dtype = config.params_dtype
            self.tensor_parallel_size = config.tensor_model_parallel_size
            self.alpha_p = torch.nn.Parameter(torch.empty((), dtype=dtype))
            self.alpha_n = torch.nn.Parameter(torch.empty((), dtype=dtype))
            self.beta = torch.nn.Parameter(torch.empty((), dtype=dtype), requires_grad=False)
            self.eps = torch.nn.Parameter(torch.empty((), dtype=dtype), requires_grad=False)
            for parameter in (self.alpha_p, self.alpha_n, self.beta, self.eps):
                # What megatron-core's layers set on a tensor every TP rank holds whole.
                parameter.tensor_model_parallel = False  # type: ignore[attr-defined]
                parameter.partition_dim = -1  # type: ignore[attr-defined]
                parameter.partition_stride = 1  # type: ignore[attr-defined]

        def _learned(self, parameter: Any) -> Any:
            if self.tensor_parallel_size > 1 and torch.is_grad_enabled() and parameter.requires_grad:
                from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

                return copy_to_tensor_model_parallel_region(parameter)
            return parameter

        def forward(self, x: Any) -> Any:
            alpha_p = torch.nn.functional.softplus(self._learned(self.alpha_p))
            alpha_n = self.beta + torch.nn.functional.softplus(self._learned(self.alpha_n))
            return torch.where(
                x > 0,
                alpha_p * x * x + self.beta * x,
                (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x,
            )

        def sharded_state_dict(
            self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (), metadata: Any = None
        ) -> Any:
            """Every value replicated over tensor-parallel ranks (no split axis)."""
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            state_dict = self.state_dict(prefix="", keep_vars=True)
            return make_sharded_tensors_for_checkpoint(state_dict, prefix, {}, sharded_offsets)

        def extra_repr(self) -> str:
            return "alpha_p, alpha_n (learned), beta, eps (fixed): 0-d, replicated"

    _XIELU["class"] = XIELU
    return XIELU


class XieluActivation(ModuleParameters):
    """Every MLP's activation becomes xIELU with its layer's alpha_p / alpha_n (learned) and
    beta / eps (fixed) as replicated 0-d tensors under mlp.activation_func (Apertus)."""

    name: ClassVar[str] = "xielu_activation"
    stage: ClassVar[Stage] = "model"
    not_in_megatron_lm: ClassVar[str | None] = (
        "xIELU MLP activation with per-layer alpha_p / alpha_n / beta / eps "
        "(mlp.activation_func.*; Megatron-LM has no xIELU)"
    )

    def apply(self, target: Any) -> None:
        xielu = _xielu_class()
        decoder = getattr(target, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            mlp = layer.mlp
            if not hasattr(mlp, "linear_fc1") or mlp.config.gated_linear_unit:
                from bridgegen.bridge.errors import ConfigError

                raise ConfigError(
                    "xielu_activation: needs a dense, non-gated MLP (linear_fc1 -> xIELU -> linear_fc2)"
                )
            if getattr(mlp.config, "use_te_activation_func", False) or mlp.config.bias_activation_fusion:
                from bridgegen.bridge.errors import ConfigError

                raise ConfigError(
                    "xielu_activation: the MLP would not call activation_func "
                    "(use_te_activation_func / bias_activation_fusion is set)"
                )
            # A Module assigned to the attribute MLP.forward calls registers it as a submodule:
            # MLP.sharded_state_dict then saves it as mlp.activation_func.*.
            mlp.activation_func = xielu(mlp.config)


def _moe_submodules(mlp_spec: Any) -> Any:
    """The MoESubmodules of a layer spec's MLP entry: a ModuleSpec's ``submodules``
    (megatron-core 0.16) or a ``functools.partial``'s ``submodules`` keyword (0.19); None for a
    dense MLP."""
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords.get("submodules")
    return getattr(mlp_spec, "submodules", None)


def _biased_softmax_router_class(norm_min: float) -> type:
    """megatron-core's TopKRouter with ERNIE 4.5's routing (see BiasedSoftmaxRouter)."""
    import torch
    from megatron.core.transformer.moe.moe_utils import (
        apply_router_token_dropping,
        compute_routing_scores_for_aux_loss,
    )
    from megatron.core.transformer.moe.router import TopKRouter

    class BiasedSoftmaxTopKRouter(TopKRouter):  # type: ignore[misc]
        """Top k by softmax + expert_bias; weights: the unbiased softmax of the picked experts
        over their sum, the sum clamped at ``norm_min`` (transformers' Ernie4_5_MoeTopKRouter).

        ``expert_bias`` ([num_experts], float32, a persistent buffer like megatron-core's own)
        is a fixed statistic here: megatron-core's aux-loss-free update
        (``moe_router_enable_expert_bias``) stays off, as transformers does not train it.
        """

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            if self.enable_expert_bias:
                raise ValueError(
                    "biased_softmax_router keeps its own expert_bias; moe_router_enable_expert_bias must be off"
                )
            del self.expert_bias  # TopKRouter's plain ``None`` attribute
            self.register_buffer(
                "expert_bias",
                torch.zeros(config.num_moe_experts, dtype=torch.float32, device=self.weight.device),
            )
            self.frozen_expert_bias = True
            self.norm_min = norm_min

        def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Any:
            seq_length, bsz = logits.shape[:2]
            logits = logits.view(-1, self.config.num_moe_experts)
            if padding_mask is not None:
                padding_mask = padding_mask.reshape(-1)
            logits = self.apply_z_loss(logits, padding_mask=padding_mask)

            # transformers: softmax in float32, top k of (softmax + bias), gather the unbiased
            # softmax, divide by clamp(sum, min=moe_norm_min).
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            _, top_indices = torch.topk(scores + self.expert_bias.float(), k=self.topk, dim=-1)
            picked = torch.gather(scores, dim=-1, index=top_indices)
            picked = picked / torch.clamp(picked.sum(dim=-1, keepdim=True), min=self.norm_min)
            probs = torch.zeros_like(scores).scatter(1, top_indices, picked).type_as(logits)
            routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top_indices, True)

            # What TopKRouter.routing does after its top k (megatron-core 0.16 and 0.19 alike).
            if self.config.moe_expert_capacity_factor is not None:
                probs, routing_map = apply_router_token_dropping(
                    probs,
                    routing_map,
                    router_topk=self.topk,
                    capacity_factor=self.config.moe_expert_capacity_factor,
                    drop_policy=self.config.moe_token_drop_policy,
                    pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
                )
            if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
                map_for_aux_loss, scores_for_aux_loss = compute_routing_scores_for_aux_loss(
                    logits,
                    self.topk,
                    self.score_function,
                    fused=self.config.moe_router_fusion,
                    padding_mask=padding_mask,
                )
                with_padding = padding_mask is not None
                probs = self._apply_aux_loss(
                    probs, scores_for_aux_loss, map_for_aux_loss, with_padding_mask=with_padding
                )
                probs = self._apply_seq_aux_loss(
                    probs,
                    scores_for_aux_loss,
                    map_for_aux_loss,
                    seq_length,
                    bsz,
                    with_padding_mask=with_padding,
                )
                probs = self._apply_global_aux_loss(
                    probs, scores_for_aux_loss, map_for_aux_loss, with_padding_mask=with_padding
                )
            return probs, routing_map

    return BiasedSoftmaxTopKRouter


class BiasedSoftmaxRouter(ModuleParameters):
    """ERNIE 4.5 MoE routing: a softmax over all experts, the top k picked by softmax +
    expert_bias (HF's e_score_correction_bias), weighted by the unbiased softmax renormalised
    over the picked experts with the sum clamped at ``norm_min``. Replaces the router of every
    MoE layer of the layer spec."""

    name: ClassVar[str] = "biased_softmax_router"
    stage: ClassVar[Stage] = "layer_spec"
    not_in_megatron_lm: ClassVar[str | None] = (
        "softmax router picking the top k by softmax + expert_bias (selection only; weights from the "
        "unbiased softmax, renormalised with the sum clamped at {norm_min}); --moe-router-enable-expert-bias "
        "adds the bias to sigmoid scores only"
    )
    norm_min: float

    def apply(self, target: Any) -> None:
        from megatron.core.transformer.moe.moe_layer import MoESubmodules

        router = _biased_softmax_router_class(float(self.norm_min))
        for layer_spec in target.layer_specs:
            submodules = _moe_submodules(getattr(layer_spec.submodules, "mlp", None))
            if isinstance(submodules, MoESubmodules):
                submodules.router = router


def _post_rope_rms_norm_class() -> type:
    import torch

    class PostRopeRMSNorm(torch.nn.Module):
        """A q/k RMSNorm moved after RoPE: the identity where megatron-core calls it (before
        RoPE); ``normalize`` is the norm, computed as transformers' HunYuan RMSNorm (float32,
        then weight times the result in the input dtype). Holds the norm's weight under the
        same name (``q_layernorm.weight``), replicated over tensor-parallel ranks."""

        normalization = "RMSNorm"

        def __init__(self, weight: torch.nn.Parameter, eps: float) -> None:
            super().__init__()
            self.weight = weight
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def normalize(self, x: torch.Tensor) -> torch.Tensor:
            dtype = x.dtype
            hidden = x.to(torch.float32)
            hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * hidden.to(dtype)

    return PostRopeRMSNorm


class QkNormAfterRope(ModuleParameters):
    """HunYuan V1: the q/k RMSNorm (per head) applied after the rotary embedding. megatron-core
    norms q and k before RoPE; in every attention layer, the built q/k norms become the
    identity there and norm the query and key at the core attention's input, which is after
    RoPE (megatron-core rotates q and k before calling its core attention)."""

    name: ClassVar[str] = "qk_norm_after_rope"
    stage: ClassVar[Stage] = "model"
    not_in_megatron_lm: ClassVar[str | None] = (
        "q/k RMSNorm after RoPE (Megatron-LM's --qk-layernorm norms q and k before RoPE)"
    )

    def apply(self, target: Any) -> None:
        import torch

        from bridgegen.bridge.errors import ConfigError

        norm_class = _post_rope_rms_norm_class()
        for layer in getattr(getattr(target, "decoder", None), "layers", []):
            attention: Any = getattr(layer, "self_attention", None)
            q_norm = getattr(attention, "q_layernorm", None)
            k_norm = getattr(attention, "k_layernorm", None)
            if q_norm is None or k_norm is None or getattr(q_norm, "weight", None) is None:
                raise ConfigError(
                    f"qk_norm_after_rope: layer {layer.layer_number} has no q/k norms to move (qk_layernorm must be on)"
                )
            for norm in (q_norm, k_norm):
                declared = getattr(type(norm), "normalization", None)
                if declared != "RMSNorm" and not isinstance(norm, torch.nn.RMSNorm):
                    raise ConfigError(
                        f"qk_norm_after_rope: the q/k norms must be RMSNorms, not {type(norm).__name__}"
                    )
            eps = float(layer.config.layernorm_epsilon)
            attention.q_layernorm = norm_class(q_norm.weight, eps)
            attention.k_layernorm = norm_class(k_norm.weight, eps)
            attention.core_attention.register_forward_pre_hook(
                _norm_query_and_key(attention.q_layernorm, attention.k_layernorm), with_kwargs=True
            )


def _norm_query_and_key(q_norm: Any, k_norm: Any) -> Any:
    """A forward pre-hook on megatron-core's core attention (called as ``(query, key, value,
    attention_mask, ...)``, query and key already rotated): q/k norms on its query and key."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) >= 2:
            return (q_norm.normalize(args[0]), k_norm.normalize(args[1]), *args[2:]), kwargs
        kwargs = dict(kwargs)
        kwargs["query"] = q_norm.normalize(kwargs["query"])
        kwargs["key"] = k_norm.normalize(kwargs["key"])
        return args, kwargs

    return hook
