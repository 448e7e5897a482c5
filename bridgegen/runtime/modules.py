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
