"""Reading a model's tensors from a megatron-core distributed checkpoint saved at any layout:
each parameter's regions of the saved global tensors, from memory-mapped items where they are
plain tensors and through torch's checked reader otherwise, a batch at a time, read ahead."""

from __future__ import annotations

import collections
import math
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.engines.pieces import Piece, parameter_pieces
from bridgegen.formats import dist_items, megatron_checkpoint
from bridgegen.formats.megatron_checkpoint import (
    first_error_of_torch_checkpoint,
    sharded_state_dict,
)
from bridgegen.plan.weight_map import model_tensors


def _batches(sizes: list[tuple[str, int]], batch_bytes: int) -> list[list[str]]:
    """Consecutive parameter names grouped into loads of at most ``batch_bytes`` (a larger
    parameter is a batch of its own)."""
    batches: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, size in sizes:
        if current and used + size > batch_bytes:
            batches.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        batches.append(current)
    return batches

_PLANNERS: dict[str, Any] = {}

# Batches of a streaming export read ahead of the one being written, each in its own thread.
BATCHES_AHEAD = 2

def _region_planner(regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> Any:
    """A torch DCP load planner that reads rectangular regions of saved global tensors
    (key, global offset -> target tensor of the region's shape) from whatever chunks the
    checkpoint holds them in. The class is made once: a class per call would keep each
    batch's tensors alive in reference cycles until the garbage collector ran."""
    if "region" not in _PLANNERS:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class RegionLoadPlanner(DefaultLoadPlanner):
            regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]

            def create_local_plan(self) -> LoadPlan:
                items = []
                for (key, offsets), target in self.regions.items():
                    stored = self.metadata.state_dict_metadata[key]  # type: ignore[union-attr]
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.size())
                    items += create_read_items_for_chunk_list(key, stored, [chunk])  # type: ignore[arg-type]
                return LoadPlan(items)

            def resolve_tensor(self, read_item: Any) -> torch.Tensor:
                index = read_item.dest_index
                target = self.regions[(index.fqn, tuple(int(x) for x in index.offset))]
                for dim, (start, length) in enumerate(
                    zip(read_item.dest_offsets, read_item.lengths, strict=True)
                ):
                    target = target.narrow(dim, int(start), int(length))
                return target

            def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
                pass  # read in place into the target's region

        _PLANNERS["region"] = RegionLoadPlanner
    planner = _PLANNERS["region"]()
    planner.regions = regions
    return planner

def region_reads(metadata: Any, piece: Piece) -> list[Any]:
    """torch's read items for ``piece``'s region of its saved global tensor: which stored chunks
    hold which parts of it, whatever layout the checkpoint was saved at."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    stored = metadata.state_dict_metadata[piece.key]
    chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offset), sizes=torch.Size(piece.region))
    return list(create_read_items_for_chunk_list(piece.key, stored, [chunk]))

def covered_reads(metadata: Any, piece: Piece, folder: Any) -> list[Any]:
    """``region_reads`` of ``piece``, which must cover every value of its region: a region the
    stored chunks do not cover would be left as whatever memory held (the config asks for more
    than the checkpoint holds)."""
    reads = region_reads(metadata, piece)
    covered = sum(math.prod(int(n) for n in read.lengths) for read in reads)
    if covered != math.prod(piece.region):
        raise WeightError(
            f"{folder}: {piece.key!r} at offset {list(piece.offset)}: the checkpoint holds {covered} of the "
            f"{math.prod(piece.region)} values of this region; the config does not describe these tensors"
        )
    return reads


def _whole_item(tensor: torch.Tensor, plans: list[tuple[Piece, list[Any]]]) -> Any:
    """The storage index of the one saved item that is all of meta tensor ``tensor`` (one
    piece, the whole parameter, read from one whole stored chunk), else None."""
    if not tensor.is_meta or len(plans) != 1 or len(plans[0][1]) != 1:
        return None
    piece, (read,) = plans[0]
    whole_parameter = (
        piece.storage_offset == 0
        and piece.shape == tuple(tensor.shape)
        and piece.stride == tuple(tensor.stride())
    )
    whole_chunk = not any(read.storage_offsets) and tuple(read.lengths) == piece.region
    return read.storage_index if whole_parameter and whole_chunk else None

def _copy_mapped(items: Any, metadata: Any, reads: list[Any], region: torch.Tensor) -> bool:
    """Copy the parts of ``region`` that ``reads`` name from the memory-mapped items; False
    (nothing copied) when one of them is not a plain tensor item."""
    sources = [(read, metadata.storage_data[read.storage_index]) for read in reads]
    stored = [(read, info, items.tensor(info)) for read, info in sources]
    if any(value is None for _, _, value in stored):
        for _, info, value in stored:
            if value is not None:
                items.release(info)  # read for nothing: torch's reader reads the region
        return False
    for read, info, value in stored:
        part, target = value, region
        for dim, (source_start, target_start, length) in enumerate(
            zip(read.storage_offsets, read.dest_offsets, read.lengths, strict=True)
        ):
            part = part.narrow(dim, int(source_start), int(length))
            target = target.narrow(dim, int(target_start), int(length))
        target.copy_(part)
        items.release(info)
    return True

def checkpoint_values(
    model: torch.nn.Module,
    folder: Any,
    *,
    per_layer_keys: bool,
    batch_bytes: int = 256 * 2**20,
    progress: Callable[[int], object] | None = None,
    only: set[str] | None = None,
    check_keys: bool = True,
) -> Any:
    """Yield (name, tensor) for every tensor of ``model``, read from the dist checkpoint in
    ``folder`` a batch of parameters at a time; every item read is checked against its CRC32s
    (``dist_items.verifying_reader``). megatron-core's sharded state dict of the model says
    where each parameter lies in which saved global tensor (a layer of a stacked key, the halves
    of a fused fc1, an expert); torch reads those regions from the chunks of whatever layout the
    checkpoint was saved at. A meta-device model gets new tensors; a real one (a rank's part of
    a parallel model) is filled in place, and the tensors yielded are its own."""
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    tensors = dict(model_tensors(model))
    names = {id(tensor): name for name, tensor in tensors.items()}
    request = sharded_state_dict([model], per_layer_keys)
    if check_keys:
        megatron_checkpoint.check_keys(request, folder)
    apply_factories(request)
    # The metadata is read once: torch reads .metadata on every load otherwise, and a large
    # model's index is big and its batches many.
    metadata = dist_items.verifying_reader(folder).read_metadata()
    megatron_checkpoint.check_shapes(request, metadata, folder)
    pieces: dict[str, list[Piece]] = {}
    for piece in parameter_pieces(request, names):
        pieces.setdefault(piece.name, []).append(piece)
    sizes = [
        (name, tensor.numel() * tensor.element_size())
        for name, tensor in tensors.items()
        if only is None or name in only
    ]
    items = dist_items.MappedItems(folder)

    def read(batch: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The batch's values, and for each one that is a view of a checkpoint file, its item
        (released once the value is used). Regions whose items are plain tensors are read from
        the memory-mapped files (``MappedItems``); any other, by torch's reader."""
        real: dict[str, torch.Tensor] = {}
        held: dict[str, Any] = {}
        by_torch: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for name in batch:
            if name not in pieces:
                raise WeightError(f"{folder}: no checkpoint key holds Megatron tensor {name!r}")
            plans = [(piece, covered_reads(metadata, piece, folder)) for piece in pieces[name]]
            whole = _whole_item(tensors[name], plans)
            if whole is not None:
                value = items.tensor(metadata.storage_data[whole])
                if value is not None:
                    real[name] = value.reshape(tensors[name].shape)
                    held[name] = metadata.storage_data[whole]
                    continue
            target = (
                torch.empty(tensors[name].shape, dtype=tensors[name].dtype)
                if tensors[name].is_meta
                else tensors[name].detach()  # filled in place (this thread has no no_grad)
            )
            real[name] = target
            for piece, reads in plans:
                region = piece.of(target)
                if not _copy_mapped(items, metadata, reads, region):
                    by_torch[(piece.key, piece.offset)] = region
        if by_torch:
            reader = dist_items.verifying_reader(folder)  # one per batch: batches are read in parallel
            reader.read_metadata = lambda *args, **kwargs: metadata
            planner = _region_planner(by_torch)
            try:
                with first_error_of_torch_checkpoint():
                    _load_state_dict({}, reader, planner=planner, no_dist=True)
                reader.checks.finish()
            except Exception as exc:
                # A failed CRC check raised inside torch's zip reader comes out wrapped.
                problem = reader.checks.problem()
                if problem is not None:
                    raise problem from None
                if isinstance(exc, pickle.UnpicklingError):  # torch's weights-only loader said no
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "not a tensor"
                    raise WeightError(
                        f"{folder}: a tensor item of {', '.join(sorted({key for key, _ in by_torch}))[:200]} "
                        f"is not a plain tensor; refused ({reason})"
                    ) from None
                raise
            planner.regions = {}
        return real, held

    # The next batches are read in other threads while this one is converted and written: each
    # read spends as long checking CRC32s and copying as waiting for the disk, so two keep it busy.
    batches = _batches(sizes, batch_bytes)
    pool = ThreadPoolExecutor(max_workers=BATCHES_AHEAD, thread_name_prefix="bridgegen-read-ahead")
    try:
        ahead = collections.deque(pool.submit(read, batch) for batch in batches[:BATCHES_AHEAD])
        for index, batch in enumerate(batches):
            real, held = ahead.popleft().result()
            if index + BATCHES_AHEAD < len(batches):
                ahead.append(pool.submit(read, batches[index + BATCHES_AHEAD]))
            for name in batch:
                if progress is not None:
                    progress(1)
                yield name, real.pop(name)
                if name in held:  # the value was a view of the file, and is used now
                    items.release(held.pop(name))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
