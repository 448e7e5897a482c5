"""The user-facing conversion API: one HF model, its bridge, and a Megatron model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bridgegen.runtime.bridge import Bridge, Wrapper
from bridgegen.runtime.config import MegatronConfig, raise_if_a_config_check_failed, start_config_checks
from bridgegen.runtime.errors import BridgeWarning, ConfigError, WeightError
from bridgegen.runtime.formats.key_names import KeyNames
from bridgegen.runtime.fp8 import block_size
from bridgegen.runtime.plan import WeightMap, hf_layer_numbers, mtp_layer_numbers
from bridgegen.runtime.progress import progress_bar
from bridgegen.runtime.quirks import PARAMETERS, ModuleParameters, RuntimeModule, parameter_type_error
from bridgegen.runtime.safetensors_io import Checkpoint, HFDirWriter, PlannedTensor, stream_tensors
from bridgegen.runtime.weights import LoadStats, iter_hf_from_full, load_into, model_tensors

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` -> torch.bfloat16; an error listing the accepted names otherwise."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in DTYPE_NAMES.values():
            raise ConfigError(
                f"dtype {value} is not supported; choose one of {', '.join(sorted(DTYPE_NAMES))}"
            )
        return value
    try:
        return DTYPE_NAMES[value]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {value!r}; choose one of {', '.join(sorted(DTYPE_NAMES))}"
        ) from None


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


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the HF folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


@dataclass
class ModelBridge:
    """An HF model's bridge and Megatron config; builds, loads and exports Megatron models."""

    bridge: type[Bridge]
    config: MegatronConfig
    hf_dir: Path | None = None
    drop_mtp: bool = False
    # How checkpoint keys are named (see formats/key_names.py) and whether every layer has keys
    # of its own (a checkpoint saved so) rather than stacked ones.
    key_names: KeyNames = KeyNames.te
    per_layer_keys: bool = False

    @staticmethod
    def from_hf_config(hf_config: dict[str, Any], source: str = "config.json") -> ModelBridge:
        from bridgegen.runtime.registry import bridge_for_config

        bridge = bridge_for_config(hf_config)
        return ModelBridge(bridge, bridge.to_megatron_config(hf_config, source=source))

    @staticmethod
    def from_hf_dir(hf_dir: str | os.PathLike[str]) -> ModelBridge:
        data = read_hf_config(hf_dir)
        found = ModelBridge.from_hf_config(data, source=str(Path(hf_dir) / "config.json"))
        found.hf_dir = Path(hf_dir)
        return found.without_absent_mtp()

    # ----------------------------------------------------------------- building

    def wrapper(self) -> Wrapper | None:
        """Where the language model sits when the HF architecture is a larger model."""
        return self.bridge.wrappers.get(self.config.hf_architecture or "")

    def weight_map(self) -> WeightMap:
        wrapper = self.wrapper()
        return WeightMap(
            self.bridge.weight_rules,
            self.config,
            self.bridge.hf_ignore,
            ignore_layers_from=int(self.config.value("num_layers")) if self.drop_mtp else None,
            hf_prefix=wrapper.weight_prefix if wrapper else "",
            carried=wrapper.carried_weights if wrapper else (),
        )

    def carried_tensors(
        self, hf_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Checkpoint | None, list[PlannedTensor]]:
        """The HF tensors outside the language model (e.g. a vision tower) that an export
        writes back unchanged, read from ``hf_dir`` (default: the source folder). Floating
        point ones are planned in ``dtype`` when given. Empty when the architecture has none."""
        wrapper = self.wrapper()
        if wrapper is None or not wrapper.carried_weights:
            return None, []
        folder = Path(hf_dir) if hf_dir is not None else self.hf_dir
        what = ", ".join(f"{prefix}*" for prefix in wrapper.carried_weights)
        if folder is None:
            raise WeightError(
                f"{self.config.hf_architecture} holds {what} tensors besides the language model; "
                "writing it needs the source HF folder they come from"
            )
        try:
            checkpoint = Checkpoint.open(folder)
        except WeightError as exc:
            raise WeightError(
                f"{exc} (looking for the {what} tensors of {self.config.hf_architecture})"
            ) from None
        planned = [
            PlannedTensor(
                name,
                dtype
                if dtype is not None and info.dtype.is_floating_point and info.dtype.itemsize > 1
                else info.dtype,
                info.shape,
            )
            for name, info in sorted(checkpoint.tensors.items())
            if name.startswith(wrapper.carried_weights)
        ]
        if not planned:
            raise WeightError(
                f"{folder}: holds no {what} tensors, which a {self.config.hf_architecture} checkpoint needs"
            )
        return checkpoint, planned

    def with_vocab_multiple(self, multiple: int) -> ModelBridge:
        """The same model with its embedding rows padded to a multiple of ``multiple``."""
        if multiple < 1:
            raise ConfigError(f"vocab multiple must be at least 1, got {multiple}")
        values = dict(self.config.values, make_vocab_size_divisible_by=multiple)
        values.pop("padded_vocab_size", None)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, values=values))

    def megatron_lm_arguments(self, dtype: torch.dtype, tokenizer_model: str | None = None) -> Any:
        """Megatron-LM's arguments for this model (``formats.megatron_lm.LmArguments``)."""
        from bridgegen.runtime.formats.megatron_lm import lm_arguments

        return lm_arguments(
            self.config,
            padded_vocab_size=self.config.padded_vocab_size(),
            vocab_multiple=self.config.vocab_multiple,
            key_names=self.key_names,
            dtype=dtype,
            tokenizer_model=tokenizer_model,
            runtime_modules=[parameters for _, parameters in self.runtime_modules()],
        )

    def without_mtp(self) -> ModelBridge:
        """The same model without its multi-token prediction layers: they are not built, their
        HF tensors (layers numbered from num_layers on) are skipped on import, and an export
        says num_nextn_predict_layers 0, as it holds none."""
        values = dict(self.config.values)
        values["mtp_num_layers"] = None
        return dataclasses.replace(
            self, config=dataclasses.replace(self.config, values=values), drop_mtp=True
        )

    def without_absent_mtp(self) -> ModelBridge:
        """Without the multi-token prediction layers the config declares when the source
        checkpoint holds no tensor of any of them, with a warning (transformers writes
        DeepSeek-V3 configs with one MTP layer by default, and its model has none). Layers
        partly present are left to the weight check, which names the missing tensors."""
        numbers = mtp_layer_numbers(self.config)
        if not numbers or self.hf_dir is None:
            return self
        try:
            names = Checkpoint.open(self.hf_dir).names()
        except WeightError:
            return self  # no weights here (a config-only folder): nothing to compare with
        if hf_layer_numbers(names) & set(numbers):
            return self
        layers = ", ".join(str(n) for n in numbers)
        warnings.warn(
            BridgeWarning(
                f"{self.hf_dir / 'config.json'}: declares {len(numbers)} multi-token prediction "
                f"layer(s) (HF layer {layers}) but the checkpoint holds no tensor of them; converting "
                "without them (as --drop-mtp does; an export will declare 0)"
            ),
            stacklevel=2,
        )
        return self.without_mtp()

    def default_dtype(self) -> torch.dtype:
        if self.hf_dir is not None:
            return Checkpoint.open(self.hf_dir).floating_dtype()
        return torch.float32

    def transformer_config(self, dtype: str | torch.dtype | None = None, **parallel: Any) -> Any:
        from bridgegen.runtime.megatron import transformer_config

        return transformer_config(
            self.config, params_dtype=parse_dtype(dtype) or self.default_dtype(), **parallel
        )

    def runtime_modules(self) -> list[tuple[RuntimeModule, ModuleParameters]]:
        """The spec's runtime modules that apply to this config (every field a module reads has
        a value), with their parameters, each checked against the type the module declares."""
        applied = []
        for name, bindings in sorted(self.bridge.runtime_modules.items()):
            module = RuntimeModule(name)
            values = {parameter: self.config.values.get(field) for parameter, field in bindings.items()}
            if any(value is None or value is False for value in values.values()):
                continue
            for parameter, value in sorted(values.items()):
                reason = parameter_type_error(module, parameter, value)
                if reason is not None:
                    raise ConfigError(
                        f"{self.config.family}: Megatron field {bindings[parameter]!r} feeds parameter "
                        f"{parameter!r} of runtime module {name!r}: {reason}"
                    )
            applied.append((module, PARAMETERS[module](**values)))
        return applied

    def _refuse_unimplemented(self) -> None:
        """An extra Megatron field with a value that no runtime module reads is a quirk the
        model would silently lack: refuse to build it."""
        read = {field for bindings in self.bridge.runtime_modules.values() for field in bindings.values()}
        pending = sorted(
            name
            for name, value in self.config.values.items()
            if name not in read and value is not None and name in _extra_fields(self.bridge)
        )
        if pending:
            raise ConfigError(
                f"{self.config.family}: the runtime cannot build a model with {', '.join(pending)} yet "
                "(config conversion works; weights and forward need these quirks implemented)"
            )

    def build_model(
        self,
        dtype: str | torch.dtype | None = None,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        transformer_config: Any = None,
        parallel_output: bool = True,
    ) -> torch.nn.Module:
        """A megatron-core GPTModel for this config, parameters allocated but not initialised."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        from bridgegen.runtime.cpu_support import enable_cpu_execution

        self._refuse_unimplemented()
        ensure_model_parallel()
        enable_cpu_execution()
        config = transformer_config if transformer_config is not None else self.transformer_config(dtype)
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
        )
        if self.config.megatron_model == "mla":
            from bridgegen.runtime.modules import use_latent_core_attention

            use_latent_core_attention(spec, q_lora=self.config.values.get("q_lora_rank") is not None)
        from bridgegen.runtime.formats.key_names import use_key_names

        use_key_names(spec, self.key_names)
        from bridgegen.runtime import modules

        values = self.config.values
        selected = self.runtime_modules()
        if config.layernorm_zero_centered_gamma:
            modules.use_zero_centered_norms(spec)
        for module, parameters in selected:
            if module in modules.BLOCK_SPEC_MODULES:
                modules.BLOCK_SPEC_MODULES[module](spec, parameters)
        mtp_spec = None
        if self.config.values.get("mtp_num_layers"):
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

            # MTP layers reuse the last decoder layer's spec (the latent attention swap included).
            mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp_stage)
        model_kwargs = self.config.model_values()
        rows = self.config.padded_vocab_size()
        if rows % config.tensor_model_parallel_size:
            raise ConfigError(
                f"{self.config.family}: {rows} vocab rows do not split over tensor parallel size "
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
            share_embeddings_and_output_weights=bool(
                model_kwargs.pop("share_embeddings_and_output_weights", False)
            ),
            vp_stage=vp_stage,
            mtp_block_spec=mtp_spec,
            **{k: v for k, v in model_kwargs.items() if k != "vocab_size"},
        )
        _parameters_in(model, config.params_dtype)
        for module, parameters in selected:
            if module in modules.MODEL_MODULES:
                modules.MODEL_MODULES[module](model, parameters)
        if self.config.rope.needs_runtime_rope():
            modules.use_hf_rope(
                model,
                self.config.rope,
                float(values.get("rotary_base", 10000.0)),
                int(values["max_sequence_length"]),
            )
        return model

    # ----------------------------------------------------------------- weights

    def load_hf_weights(
        self, model: torch.nn.Module, hf_dir: str | os.PathLike[str] | None = None, *, progress: bool = False
    ) -> LoadStats:
        """Copy an HF checkpoint into ``model`` (single process: the whole model)."""
        folder = Path(hf_dir) if hf_dir is not None else self.hf_dir
        if folder is None:
            raise WeightError("no HF folder given to load weights from")
        checkpoint = Checkpoint.open(folder)
        with progress_bar(progress, sum(1 for _ in model_tensors(model)), "import") as update:
            return load_into(
                self.weight_map(),
                model,
                checkpoint,
                progress=update,
                fp8_block=block_size(self.config.hf_passthrough),
            )

    def iter_hf_weights(
        self, model: torch.nn.Module, dtype: str | torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (HF name, tensor) pairs from a single-process model, e.g. to refit an
        inference engine in process. Tensors are views of the model where possible; each keeps
        its own dtype unless ``dtype`` is given."""
        yield from iter_hf_from_full(self.weight_map(), model_tensors(model), dtype=parse_dtype(dtype))

    def hf_config(self) -> dict[str, Any]:
        return self.bridge.to_hf_config(self.config)

    def planned_hf_tensors(self, model: torch.nn.Module, dtype: torch.dtype | None) -> list[PlannedTensor]:
        """Every HF tensor (name, dtype, shape) an export of ``model`` writes, in order,
        worked out on meta copies: nothing is read. Each keeps its Megatron tensor's dtype
        (a router's fp32 expert bias in a bf16 model stays fp32) unless ``dtype`` is given."""
        meta = [
            (name, torch.empty(t.shape, dtype=t.dtype, device="meta")) for name, t in model_tensors(model)
        ]
        return [
            PlannedTensor(n, t.dtype, tuple(t.shape))
            for n, t in iter_hf_from_full(self.weight_map(), meta, dtype=dtype)
        ]

    def export_config(self, dtype: torch.dtype) -> dict[str, Any]:
        """The config.json of an export whose tensors are plain ``dtype``."""
        hf_config = self.hf_config()
        hf_config.pop("quantization_config", None)  # exports write unquantized tensors
        # transformers >= 4.56 writes `dtype`, older versions `torch_dtype`; state the truth.
        for key in ("dtype", "torch_dtype"):
            if key in hf_config or key == "torch_dtype":
                hf_config[key] = str(dtype).removeprefix("torch.")
        return hf_config

    def export_hf(
        self,
        model: torch.nn.Module,
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        dtype: str | torch.dtype | None = None,
        max_shard_bytes: int = 5 * 2**30,
        progress: bool = False,
        values: Iterator[tuple[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write ``model`` as an HF folder: config, side files from the source, sharded
        safetensors with an index. Atomic: the folder appears only when complete. With
        ``values``, ``model`` may be a meta-device model that only plans the files, and
        ``values`` yields each of its tensors' real value in ``model_tensors`` order. Every
        tensor keeps its own dtype unless ``dtype`` is given."""
        target = parse_dtype(dtype)
        hf_config = self.export_config(target or _model_dtype(model))
        tensors = list(model_tensors(model))
        weight_map = self.weight_map()
        planned = self.planned_hf_tensors(model, target)
        source, carried = self.carried_tensors(dtype=target)

        def produce(update: Callable[[int], object] | None) -> Iterator[tuple[str, torch.Tensor]]:
            converted = iter_hf_from_full(weight_map, values if values is not None else tensors, dtype=target)
            passed = stream_tensors(source, carried) if source is not None else iter(())
            for item in itertools.chain(converted, passed):
                start_config_checks()  # the first tensor is read: every import the export needs is done
                raise_if_a_config_check_failed()
                yield item
                if update is not None:
                    update(1)

        with (
            progress_bar(progress, len(planned) + len(carried), "export") as update,
            HFDirWriter(out_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes) as writer,
        ):
            writer.write_tensors(planned + carried, produce(update))
            writer.write_json("config.json", hf_config)
            writer.copy_side_files(self.hf_dir)
        return Path(out_dir)


def _extra_fields(bridge: type[Bridge]) -> frozenset[str]:
    from bridgegen.runtime.config import MODEL_FIELDS

    return frozenset(bridge.extra_fields) - MODEL_FIELDS


def _parameters_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter in ``dtype``, as Megatron-LM's Float16Module makes them
    for a --bf16 / --fp16 run (torch norms are built in float32 whatever params_dtype says).
    Buffers keep their own dtype: megatron-core keeps a router's expert bias in float32."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    config = getattr(model, "config", None)
    dtype = getattr(config, "params_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
