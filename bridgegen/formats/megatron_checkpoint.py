"""Megatron-Core distributed checkpoints laid out as Megatron-LM and Megatron-Bridge load them,
and read back from whatever those tools (or we) wrote.

An import writes::

    OUT/latest_checkpointed_iteration.txt   "release"
    OUT/release/                            the dist checkpoint: tensors + common state
                                            (args, checkpoint_version, iteration, content_metadata)
    OUT/bridgegen.json                      the bridge's config, key style and dtype
    OUT/megatron_lm_args.txt                the Megatron-LM flags that build this model
    OUT/hf_side_files/                      tokenizer / generation files (and carried tensors)

The checkpoint is saved from whatever layout the model has (every rank takes part) and loads at
any other: dist_checkpointing stores tensors by global key and offsets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bridgegen.bridge.config import MegatronConfig
from bridgegen.bridge.errors import ConfigError, WeightError
from bridgegen.formats import dist_checkpoint, foreign_config, hf_folder, megatron_lm
from bridgegen.formats.folders import CONFIG_LIMIT, read_small_text
from bridgegen.formats.key_names import detect_key_names
from bridgegen.plan.conversion import Conversion

BRIDGE_FILE = "bridgegen.json"
SIDE_FILES_DIR = "hf_side_files"
ARGS_FILE = "megatron_lm_args.txt"
TOKENIZER_DIR = "tokenizer"  # Megatron-LM and Megatron-Bridge keep the tokenizer in iter_*/tokenizer
PER_LAYER_KEY = re.compile(r"^(decoder|mtp)\.layers\.\d+\.")


def sharded_state_dict(models: list[Any], per_layer_keys: bool = False) -> dict[str, Any]:
    """The model part of the state Megatron-LM saves: ``model``, or ``model0``, ``model1``, ...
    for virtual pipeline stages, requested with the content metadata it saves."""
    metadata = dict(megatron_lm.CONTENT_METADATA, non_homogeneous_layers=per_layer_keys)
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict(metadata=dict(metadata))}
    return {f"model{i}": model.sharded_state_dict(metadata=dict(metadata)) for i, model in enumerate(models)}


@contextmanager
def first_error_of_torch_checkpoint() -> Iterator[None]:
    """Raise the error a torch distributed-checkpoint call failed with (ours: a missing source,
    a failed read), not the CheckpointException that wraps it with a page of traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        for failure in exc.failures.values():
            if isinstance(failure, tuple) and failure and isinstance(failure[0], Exception):
                raise failure[0] from None
        raise


@functools.cache
def in_process_save_strategy() -> Any:
    """The class of ``InProcessSaveStrategy``, made once, when megatron-core is first needed."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    class InProcessSaveStrategy(TorchDistSaveShardedStrategy):  # type: ignore[misc]
        """megatron-core's torch_dist format, written by torch's synchronous FileSystemWriter in
        the calling thread, one file per rank. megatron-core's own writer starts a Manager and a
        writer process per rank, which outlive a rank that is killed."""

        planner_class: Any = MCoreSavePlanner

        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            planner = self.planner_class(flatten_state_dict=False, can_run_decentralized_global_plan=False)
            with first_error_of_torch_checkpoint():
                dcp_save(mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner)

    return InProcessSaveStrategy


# ------------------------------------------------------------------------ reading


def _find_record(found: megatron_lm.CheckpointFolder) -> Path | None:
    for place in (found.path, found.root):
        if (place / BRIDGE_FILE).is_file():
            return place / BRIDGE_FILE
    return None


def _side_folder(found: megatron_lm.CheckpointFolder, hf_config: Path | None) -> Path | None:
    for place in (
        found.root / SIDE_FILES_DIR,
        found.path / SIDE_FILES_DIR,
        hf_config,
        found.path / TOKENIZER_DIR,
    ):
        if place is not None and place.is_dir():
            return place
    return None


def conversion_for_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    *,
    iteration: str | None = None,
    family: str | None = None,
    hf_config: str | os.PathLike[str] | None = None,
) -> tuple[Conversion, torch.dtype]:
    """The bridge that reads a Megatron checkpoint, and the dtype of its weights.

    ``checkpoint_dir`` is a tracker root (its latest iteration, or ``iteration``), an
    ``iter_*`` / ``release`` folder, or a flat dist checkpoint. The config comes from, in this
    order: ``bridgegen.json`` (our import), ``hf_config`` (an HF folder with config.json), or the
    checkpoint's own Megatron-LM ``args`` / Megatron-Bridge ``run_config.yaml`` together with
    ``family``. Key style (Transformer Engine or local names), stacked or per-layer keys and the
    vocab rows are read from the checkpoint's keys.
    """
    from bridgegen.formats.folders import read_hf_config
    from bridgegen.plan.bridges import bridge_for_family

    found = megatron_lm.find_checkpoint(checkpoint_dir, iteration)
    keys = dist_checkpoint.model_keys(found.path)
    if "embedding.word_embeddings.weight" not in keys and "output_layer.weight" not in keys:
        raise WeightError(f"{found.path}: holds no embedding or output layer; not a GPT model checkpoint")
    hf_dir = Path(hf_config) if hf_config is not None else None
    record_path = _find_record(found)
    if record_path is not None and hf_dir is None:
        record = json.loads(read_small_text(record_path, CONFIG_LIMIT, "bridgegen record"))
        config = MegatronConfig.from_json(json.dumps(record["megatron_config"]))
        chosen = bridge_for_family(config.family)
        if chosen is None:
            raise WeightError(
                f"{record_path}: family {config.family!r} has no bridge in this version nor in BRIDGEGEN_BRIDGES"
            )
        bridge = Conversion(chosen, config)
    elif hf_dir is not None:
        bridge = Conversion.from_hf_config(read_hf_config(hf_dir), source=str(hf_dir / "config.json"))
    else:
        bridge = Conversion.from_hf_config(_foreign_hf_config(found, family))
    embedding = keys.get("embedding.word_embeddings.weight") or keys["output_layer.weight"]
    rows, saved_dtype = embedding[0][0], embedding[1]
    if rows < bridge.config.vocab_size:
        raise WeightError(
            f"{found.path}: the embedding has {rows} rows, fewer than the config's vocab_size "
            f"{bridge.config.vocab_size}"
        )
    values = dict(bridge.config.values, padded_vocab_size=rows)
    bridge = dataclasses.replace(
        bridge,
        config=dataclasses.replace(bridge.config, values=values),
        hf_dir=_side_folder(found, hf_dir),
        key_names=detect_key_names(set(keys)),
        per_layer_keys=any(PER_LAYER_KEY.match(key) for key in keys),
    )
    return bridge, saved_dtype


def _foreign_hf_config(found: megatron_lm.CheckpointFolder, family: str | None) -> dict[str, Any]:
    run_config = foreign_config.read_run_config(found.path)
    where = str(found.path / foreign_config.RUN_CONFIG)
    source: dict[str, Any]
    if run_config is not None:
        values, activation, rope = foreign_config.values_from_run_config(run_config)
        source = run_config
    else:
        common = dist_checkpoint.read_common_state(found.path)
        args = common.get("args")
        if args is None:
            raise ConfigError(
                f"{found.path}: no {BRIDGE_FILE}, no {foreign_config.RUN_CONFIG} and no 'args' in the "
                "common state: pass --hf-config with the HF config folder of this model"
            )
        values, activation, rope = foreign_config.values_from_args(args)
        source = vars(args)
        where = f"{found.path}: args"
    if family is None:
        raise ConfigError(
            f"{where}: this checkpoint does not say which HF architecture it is; pass --family "
            "(see `bridgegen list`) or --hf-config with the HF config folder"
        )
    hf_config = foreign_config.hf_config_for(family, values, activation, rope, where, source)
    side = _side_folder(found, None)
    if side is not None:
        # Neither the run config nor args hold the special tokens' ids; the carried tokenizer does.
        hf_config.update(hf_folder.special_token_ids(side))
    return hf_config


def requested_keys(request: dict[str, Any]) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    keys: set[str] = set()
    for item in nested_values(request):
        if isinstance(item, ShardedTensor | ShardedTensorFactory):
            keys.add(item.key)
    return keys


def check_keys(request: dict[str, Any], folder: Path, present: set[str] | None = None) -> None:
    """Every model tensor of the checkpoint (``present``: its keys, read when not given) is one
    this model reads (all ranks together): a tensor no rank asks for would be dropped from the
    export without a word."""
    asked = requested_keys(request)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(asked))
        asked = {key for part in gathered for key in part}
    if present is None:
        present = set(dist_checkpoint.model_keys(folder))
    unread = sorted(present - asked)
    if unread:
        raise WeightError(
            f"{folder}: holds {len(unread)} model tensor(s) this model does not read: "
            f"{', '.join(unread[:5])}{' ...' if len(unread) > 5 else ''} (wrong --family or config?)"
        )
    absent = sorted(asked - present)
    if absent:
        raise WeightError(
            f"{folder}: lacks {len(absent)} tensor(s) this model needs: {', '.join(absent[:5])}"
            f"{' ...' if len(absent) > 5 else ''}"
        )


def check_shapes(request: dict[str, Any], metadata: Any, folder: Path) -> None:
    """Every tensor a model asks for (``request``, factories applied) is stored with the global
    shape the model's config implies: a config that disagrees with the tensors (more or fewer
    layers or experts, another hidden size) is refused before anything is read, naming the key
    and both shapes."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for item in nested_values(request):
        if not isinstance(item, ShardedTensor):
            continue
        stored = metadata.state_dict_metadata.get(item.key)
        if not isinstance(stored, TensorStorageMetadata):
            raise WeightError(f"{folder}: lacks tensor {item.key!r}, which this model needs")
        implied = [int(n) for n in item.global_shape]
        if [int(n) for n in stored.size] != implied:
            raise WeightError(
                f"{folder}: {item.key!r} is stored with shape {[int(n) for n in stored.size]}, but the config "
                f"implies {implied}: the config does not describe these tensors (wrong --family or config?)"
            )
