"""The model-holding API: build a megatron-core model for an HF model's conversion, load its
HF weights into it, stream HF tensors out of it, export it as an HF folder.

Each entry point runs inside ``progress.third_party_quieted``: megatron-core's and torch's
notices (those printed when megatron-core is first imported included) stay off the caller's
terminal, and the caller's warning filters are left as they were."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.engines.hf_export import planned_hf_tensors, write_hf_folder
from bridgegen.engines.progress import progress_bar, quietly, third_party_quieted
from bridgegen.engines.weights import LoadStats, iter_hf_from_full, load_into
from bridgegen.formats import folders, hf_folder
from bridgegen.formats.fp8 import block_size
from bridgegen.formats.hf_writer import PlannedTensor
from bridgegen.formats.megatron_checkpoint import conversion_for_checkpoint
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.megatron import build
from bridgegen.megatron.build import ensure_model_parallel
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.values import DTYPE_NAMES, parse_dtype
from bridgegen.plan.weight_map import model_tensors

__all__ = [
    "DTYPE_NAMES",
    "ModelBridge",
    "bridge_for_checkpoint",
    "ensure_model_parallel",
    "parse_dtype",
    "read_hf_config",
]

read_hf_config = folders.read_hf_config


class ModelBridge(Conversion):
    """An HF model's conversion (``plan.conversion.Conversion``) that builds, loads and exports
    megatron-core models in this process."""

    @staticmethod
    @quietly
    def from_hf_dir(hf_dir: str | os.PathLike[str]) -> ModelBridge:
        return hf_folder.conversion_of_hf_dir(hf_dir, ModelBridge)

    @classmethod
    def of(cls, conversion: Conversion) -> ModelBridge:
        """The model API over an existing conversion."""
        return cls(
            conversion.bridge,
            conversion.config,
            conversion.hf_dir,
            conversion.drop_mtp,
            conversion.key_names,
            conversion.per_layer_keys,
        )

    # ----------------------------------------------------------------- building

    @quietly
    def carried_tensors(
        self, hf_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Checkpoint | None, list[PlannedTensor]]:
        """See ``formats.hf_folder.carried_tensors``."""
        return hf_folder.carried_tensors(self, hf_dir, dtype)

    @quietly
    def megatron_lm_arguments(self, dtype: torch.dtype, tokenizer_model: str | None = None) -> Any:
        """Megatron-LM's arguments for this model (``formats.megatron_lm.LmArguments``)."""
        from bridgegen.formats.megatron_lm import arguments_for

        return arguments_for(self, dtype, tokenizer_model)

    @quietly
    def default_dtype(self) -> torch.dtype:
        return hf_folder.default_dtype(self)

    @quietly
    def transformer_config(self, dtype: str | torch.dtype | None = None, **parallel: Any) -> Any:
        return build.transformer_config_for(self, dtype, **parallel)

    @quietly
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
        return build.build_model(
            self,
            dtype,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            transformer_config=transformer_config,
            parallel_output=parallel_output,
        )

    # ----------------------------------------------------------------- weights

    @quietly
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
        tensors = iter_hf_from_full(self.weight_map(), model_tensors(model), dtype=parse_dtype(dtype))
        while True:
            with third_party_quieted():  # each step, not across the caller's own code
                item = next(tensors, None)
            if item is None:
                return
            yield item

    @quietly
    def planned_hf_tensors(self, model: torch.nn.Module, dtype: torch.dtype | None) -> list[PlannedTensor]:
        """See ``engines.hf_export.planned_hf_tensors``."""
        return planned_hf_tensors(self, model, dtype)

    @quietly
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
        """Write ``model`` as an HF folder (``engines.hf_export.write_hf_folder``)."""
        return write_hf_folder(
            self,
            model,
            out_dir,
            overwrite=overwrite,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            values=values,
        )


@quietly
def bridge_for_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    *,
    iteration: str | None = None,
    family: str | None = None,
    hf_config: str | os.PathLike[str] | None = None,
) -> tuple[ModelBridge, torch.dtype]:
    """``formats.megatron_checkpoint.conversion_for_checkpoint`` with the model API
    (``ModelBridge``): build a model for the checkpoint, load it, export it."""
    conversion, dtype = conversion_for_checkpoint(
        checkpoint_dir, iteration=iteration, family=family, hf_config=hf_config
    )
    return ModelBridge.of(conversion), dtype
