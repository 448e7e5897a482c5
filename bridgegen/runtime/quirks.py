"""The runtime modules a spec can select (no torch import here: the spec checker reads it).

Each one stands in for a quirk megatron-core's layer spec cannot express, reads one
Megatron-side config field, and is applied to a model only when that field has a value.
The modules themselves live in ``bridgegen.runtime.modules``.
"""

from __future__ import annotations

from enum import Enum


class RuntimeModule(str, Enum):
    """A quirk module, named as specs name it under ``runtime_modules``."""

    embedding_scale = "embedding_scale"  # embeddings times a constant (Gemma: sqrt(hidden_size))
    softcapped_attention = "softcapped_attention"  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping = "final_logit_softcapping"  # logits -> cap * tanh(logits / cap)
    post_layer_norms = "post_layer_norms"  # norms on the attention and MLP outputs (Gemma 2 / 3)
    local_rope_base = "local_rope_base"  # windowed layers rotate with their own base (Gemma 3)


# The Megatron-side field each module reads.
MODULE_FIELD: dict[RuntimeModule, str] = {
    RuntimeModule.embedding_scale: "embedding_scale",
    RuntimeModule.softcapped_attention: "attn_logit_softcapping",
    RuntimeModule.final_logit_softcapping: "final_logit_softcapping",
    RuntimeModule.post_layer_norms: "post_layer_norms",
    RuntimeModule.local_rope_base: "rotary_base_local",
}
