"""Comparing a megatron-core router's choices with a transformers router's on the same tokens."""

from __future__ import annotations

from typing import Any

import torch


def hf_expert_sets(hf_gate: Any, hidden: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' router on ``hidden`` [tokens, hidden]: each token's chosen experts as a
    [tokens, experts] mask, and their weights in the same places (zeros elsewhere)."""
    with torch.no_grad():
        _, weights, indices = hf_gate(hidden)
    chosen = torch.zeros(len(hidden), experts, dtype=torch.bool).scatter_(1, indices, True)
    placed = torch.zeros(len(hidden), experts).scatter_(1, indices, weights.float())
    return chosen, placed


def megatron_expert_sets(router: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's router on the same tokens (as a [tokens, 1, hidden] sequence): the
    chosen-expert mask and the weights."""
    with torch.no_grad():
        probs, routing_map = router(hidden.unsqueeze(1))
    return routing_map.bool(), probs.float()


def tokens_routed_differently(router: Any, hidden: torch.Tensor, hf_chosen: torch.Tensor, dtype: Any) -> int:
    """How many tokens the router sends to another expert set than ``hf_chosen`` when its
    routing runs with ``moe_router_dtype`` = ``dtype`` (restored after)."""
    saved = router.config.moe_router_dtype
    router.config.moe_router_dtype = dtype
    try:
        chosen, _ = megatron_expert_sets(router, hidden)
    finally:
        router.config.moe_router_dtype = saved
    return int((chosen != hf_chosen).any(dim=1).sum())
