"""The Acme team's runtime module: q/k RMSNorm after the rotary embedding.

Importable without torch (bridgegen's spec checker reads the class); torch is imported when the
module is applied to a model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from bridgegen.bridge.module_parameters import ModuleParameters, Stage


class AcmeQkNormAfterRope(ModuleParameters):
    """Queries and keys RMS-normed per head after RoPE, where megatron-core norms them before:
    the built q/k norms pass their input through unchanged, and the same weights norm the query
    and key at the core attention's input (megatron-core rotates q and k before calling it)."""

    name: ClassVar[str] = "acme_qk_norm_after_rope"
    stage: ClassVar[Stage] = "model"
    not_in_megatron_lm: ClassVar[str | None] = "q/k RMSNorm after RoPE (--qk-layernorm norms before RoPE)"

    def apply(self, target: Any) -> None:
        import torch

        for layer in target.decoder.layers:
            attention = layer.self_attention
            eps = float(layer.config.layernorm_epsilon)
            norms = (attention.q_layernorm, attention.k_layernorm)
            for norm in norms:
                norm.forward = _passthrough
            attention.core_attention.register_forward_pre_hook(_after_rope(norms, eps, torch), with_kwargs=True)


def _passthrough(x: Any) -> Any:
    return x


def _after_rope(norms: tuple[Any, Any], eps: float, torch: Any) -> Any:
    def rms(norm: Any, x: Any) -> Any:
        hidden = x.to(torch.float32)
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
        return norm.weight * hidden.to(x.dtype)

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        q_norm, k_norm = norms
        if len(args) >= 2:
            return (rms(q_norm, args[0]), rms(k_norm, args[1]), *args[2:]), kwargs
        kwargs = dict(kwargs, query=rms(q_norm, kwargs["query"]), key=rms(k_norm, kwargs["key"]))
        return args, kwargs

    return hook
