"""Building the megatron-core GPTModel of a conversion: its TransformerConfig, its layer spec
with the key names and runtime modules the spec selects, on any device (meta included)."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from bridgegen.bridge.errors import ConfigError
from bridgegen.formats.hf_folder import default_dtype
from bridgegen.plan.conversion import Conversion, KeyNames
from bridgegen.plan.values import parse_dtype
from bridgegen.plan.weight_map import model_tensors


def ensure_model_parallel(
    tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, **kwargs: Any
) -> None:
    """Initialise torch.distributed (gloo, one process if not launched by torchrun) and
    megatron-core's parallel state, unless already done."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        else:
            # One process: an in-memory store (a file store would be left in the temp folder).
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size, **kwargs)


def transformer_config_for(
    conversion: Conversion, dtype: str | torch.dtype | None = None, **parallel: Any
) -> Any:
    """The megatron-core TransformerConfig of ``conversion`` in ``dtype`` (default: its source
    weights' dtype) at the parallel sizes given."""
    from bridgegen.megatron.config import transformer_config

    return transformer_config(
        conversion.config, params_dtype=parse_dtype(dtype) or default_dtype(conversion), **parallel
    )


def _module_class(spec: Any) -> Any:
    """The class a layer-spec entry builds: a ModuleSpec's module, or (megatron-core >= 0.19)
    the function of a ``functools.partial``."""
    while True:
        if isinstance(spec, functools.partial):
            spec = spec.func
        elif hasattr(spec, "module"):
            spec = spec.module
        else:
            return spec


def _is(spec: Any, cls: type) -> bool:
    built = _module_class(spec)
    return isinstance(built, type) and issubclass(built, cls)


def use_key_names(block_spec: Any, style: KeyNames) -> None:
    """Give every layer of a megatron-core block spec the key map of ``style``
    (``formats.key_names.layer_key_map``)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from bridgegen.formats.key_names import layer_key_map

    for layer_spec in block_spec.layer_specs:
        submodules = layer_spec.submodules
        submodules.sharded_state_dict_keys_map = layer_key_map(
            style,
            latent_attention=_is(submodules.self_attention, MLASelfAttention),
            moe=_is(submodules.mlp, MoELayer),
        )


def build_model(
    conversion: Conversion,
    dtype: str | torch.dtype | None = None,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    transformer_config: Any = None,
    parallel_output: bool = True,
) -> torch.nn.Module:
    """A megatron-core GPTModel for ``conversion``, parameters allocated but not initialised."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from bridgegen.megatron import modules
    from bridgegen.megatron.cpu_support import enable_cpu_execution

    conversion.refuse_unimplemented()
    ensure_model_parallel()
    enable_cpu_execution()
    config = transformer_config if transformer_config is not None else transformer_config_for(conversion, dtype)
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
    )
    values = conversion.config.values
    if conversion.config.megatron_model == "mla":
        modules.use_latent_core_attention(spec, q_lora=values.get("q_lora_rank") is not None)
    use_key_names(spec, conversion.key_names)
    selected = conversion.runtime_modules()
    if config.layernorm_zero_centered_gamma:
        modules.use_zero_centered_norms(spec, config.normalization)
    for parameters in selected:
        if parameters.stage == "layer_spec":
            parameters.apply(spec)
    mtp_spec = None
    if values.get("mtp_num_layers"):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        # MTP layers reuse the last decoder layer's spec (the latent attention swap included).
        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage)
    model_kwargs = conversion.config.model_values()
    rows = conversion.config.padded_vocab_size()
    if rows % config.tensor_model_parallel_size:
        raise ConfigError(
            f"{conversion.config.family}: {rows} vocab rows do not split over tensor parallel size "
            f"{config.tensor_model_parallel_size}; pad them (import --vocab-multiple)"
        )
    model: torch.nn.Module = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=rows,
        max_sequence_length=int(model_kwargs.pop("max_sequence_length")),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=bool(model_kwargs.pop("share_embeddings_and_output_weights", False)),
        vp_stage=vp_stage,
        mtp_block_spec=mtp_spec,
        **{k: v for k, v in model_kwargs.items() if k != "vocab_size"},
    )
    _parameters_in(model, config.params_dtype)
    for parameters in selected:
        if parameters.stage == "model":
            parameters.apply(model)
    if conversion.config.rope.needs_runtime_rope():
        modules.use_hf_rope(
            model,
            conversion.config.rope,
            float(values.get("rotary_base", 10000.0)),
            int(values["max_sequence_length"]),
        )
    return model


def meta_model(conversion: Conversion, dtype: torch.dtype) -> torch.nn.Module:
    """The single-process megatron-core model, every parameter on the meta device."""
    with torch.device("meta"):
        model = build_model(conversion, dtype)
    # A few tensors are made on an explicit device (a router's expert bias, attention sinks'
    # softmax_offset): move them too, so every weight the checkpoint holds is made by the producer.
    for name, tensor in list(model_tensors(model)):
        if not tensor.is_meta:
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if attribute in owner._buffers:
                owner._buffers[attribute] = torch.empty_like(tensor, device="meta")
            else:
                meta = torch.empty_like(tensor, device="meta")
                owner._parameters[attribute] = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The params_dtype a megatron-core model was built with (float32 if it has no config)."""
    config = getattr(model, "config", None)
    dtype = getattr(config, "params_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _parameters_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter in ``dtype``, as Megatron-LM's Float16Module makes them
    for a --bf16 / --fp16 run (torch norms are built in float32 whatever params_dtype says).
    Buffers keep their own dtype: megatron-core keeps a router's expert bias in float32."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
