"""Building megatron-core configs and GPT models from a MegatronConfig."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from bridgegen.bridge.config import MegatronConfig
from bridgegen.bridge.errors import ConfigError


def _activation_of_a_module(x: torch.Tensor) -> torch.Tensor:
    """Stands for the activation a runtime module puts in each MLP; never left in place."""
    raise ConfigError(
        "the spec's activation is a runtime module's ('module'), but no module replaced it in this MLP"
    )


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable megatron-core applies for a Megatron activation name."""
    from megatron.core import activations

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "silu": torch.nn.functional.silu,
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
        "relu": torch.nn.functional.relu,
        "squared_relu": activations.squared_relu,
        "quick_gelu": activations.quick_gelu,
        "module": _activation_of_a_module,
    }
    if name not in table:
        raise ConfigError(f"unknown Megatron activation {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def _config_class(config: MegatronConfig) -> type[Any]:
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    chosen: type[Any] = MLATransformerConfig if config.megatron_model == "mla" else TransformerConfig
    return chosen


def transformer_config(
    config: MegatronConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    virtual_pipeline_parallel_size: int | None = None,
    expert_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    **overrides: Any,
) -> Any:
    """A megatron-core TransformerConfig (MLATransformerConfig for MLA) for conversion work.

    Parameters are left uninitialised (``perform_initialization=False``): every one of them is
    about to be overwritten by a checkpoint. Fused kernels are off so the plain-PyTorch layer
    spec runs anywhere.
    """
    cls = _config_class(config)
    names = frozenset(f.name for f in dataclasses.fields(cls))
    kwargs = config.transformer_values(names)
    rope_settings = (
        config.rope.megatron_mla_settings()
        if config.megatron_model == "mla"
        else config.rope.megatron_gpt_settings()
    )
    if "unsupported_rope_type" in rope_settings:
        unsupported = rope_settings["unsupported_rope_type"]
        raise ConfigError(f"{config.family}: RoPE type {unsupported!r} has no megatron-core equivalent yet")
    kwargs.update(
        activation_func=activation_function(config.activation),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel_size,
        expert_model_parallel_size=expert_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if "transformer_impl" in names:
        kwargs["transformer_impl"] = "local"  # the plain layer spec we build with (no Transformer Engine)
    if config.values.get("num_moe_experts"):
        kwargs.setdefault("moe_token_dispatcher_type", "allgather")
        freq = kwargs.get("moe_layer_freq")
        if isinstance(freq, list) and freq and all(item == 1 for item in freq):
            # Every layer MoE: megatron-core stacks the layers' keys only for an int frequency,
            # as Megatron-LM (--moe-layer-freq 1) and Megatron-Bridge save them.
            kwargs["moe_layer_freq"] = 1
    kwargs.update(overrides)
    expert_tp = kwargs.get("expert_tensor_parallel_size") or kwargs.get("tensor_model_parallel_size") or 1
    if kwargs.get("num_moe_experts") and kwargs.get("add_bias_linear") and expert_tp > 1:
        raise ConfigError(
            f"{config.family}: megatron-core builds experts with biases only at expert tensor "
            f"parallel size 1, not {expert_tp} (it defaults to the TP size): pass --etp 1"
        )
    try:
        built = cls(**kwargs)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ConfigError(f"{config.family}: megatron-core rejects the converted config: {exc}") from exc
    # YaRN settings for GPT models are read as attributes that are not dataclass fields.
    if config.megatron_model == "gpt":
        for name, value in config.rope.megatron_gpt_settings().items():
            if name.startswith("yarn_"):
                setattr(built, name, value)
    return built
