"""Small megatron-core modules the plain (non Transformer Engine) layer spec lacks.

megatron-core 0.16.1's multi-latent attention hands its core attention different head sizes
for keys (``k_channels``) and values (``v_channels``); only Transformer Engine's attention
accepts them. ``LatentCoreAttention`` is that core attention in plain PyTorch, selected by the
model builder for MLA models when Transformer Engine is not used.
"""

from __future__ import annotations

from typing import Any

import torch


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


def use_latent_core_attention(block_spec: Any) -> None:
    """Swap the plain spec's core attention for LatentCoreAttention in every MLA layer.

    Without Transformer Engine, megatron-core 0.16.1 stands a mock in for it, which the MLA
    module takes for the real thing (``HAVE_TE`` is true); tell it the truth first.
    """
    import megatron.core.extensions.transformer_engine as te_extension
    import megatron.core.transformer.multi_latent_attention as mla

    if not getattr(te_extension, "HAVE_TE", True):
        mla.HAVE_TE = False
    for layer_spec in block_spec.layer_specs:
        attention = getattr(layer_spec.submodules, "self_attention", None)
        submodules = getattr(attention, "submodules", None)
        if submodules is not None and hasattr(submodules, "linear_kv_down_proj"):
            submodules.core_attention = LatentCoreAttention


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm whose weight ``w`` scales by ``1 + w`` (megatron-core's zero-centred gamma),
    computed in fp32 like Gemma's, for the plain spec (whose torch norm refuses the option).
    Holding ``w`` as HF stores it keeps checkpoints bit-exact in every dtype."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **unused: Any) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def use_zero_centered_norms(block_spec: Any) -> None:
    """Every RMSNorm of the block (layer norms, q/k norms, final norm) as ZeroCenteredRMSNorm."""
    norm_slots = ("input_layernorm", "pre_mlp_layernorm")
    for layer_spec in block_spec.layer_specs:
        for slot in norm_slots:
            if _is_norm(getattr(layer_spec.submodules, slot, None)):
                setattr(layer_spec.submodules, slot, ZeroCenteredRMSNorm)
        attention = getattr(getattr(layer_spec.submodules, "self_attention", None), "submodules", None)
        for slot in ("q_layernorm", "k_layernorm"):
            if attention is not None and _is_norm(getattr(attention, slot, None)):
                setattr(attention, slot, ZeroCenteredRMSNorm)
    block_spec.layer_norm = ZeroCenteredRMSNorm


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
