"""Conversion without a model in memory.

Import: megatron-core builds the model on the meta device (no storage), so its own
``sharded_state_dict()`` stays the authority on every key, global shape and offset; torch's
distributed-checkpoint file writer then asks for one tensor at a time (``resolve_data``), and
only then is that tensor made, from memory-mapped safetensors through the spec's transform.
Memory beyond the process is one Megatron parameter and its HF sources' pages, whatever the
model's size. The files are megatron-core's torch_dist format, written by torch's own writer,
with the common state and ``metadata.json`` written by megatron-core as for any save.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from bridgegen.runtime.config import raise_if_a_config_check_failed, start_config_checks
from bridgegen.runtime.convert import ModelBridge
from bridgegen.runtime.errors import WeightError
from bridgegen.runtime.fp8 import block_size
from bridgegen.runtime.megatron_checkpoint import first_error_of_torch_checkpoint
from bridgegen.runtime.plan import plan_tensors
from bridgegen.runtime.progress import progress_bar
from bridgegen.runtime.safetensors_io import Checkpoint
from bridgegen.runtime.weights import (
    LoadStats,
    check_sources,
    fill_parameter,
    model_tensors,
    read_source_rows,
    release_sources,
    source_rows,
)


def return_freed_buffers_to_the_system() -> None:
    """Have glibc serve allocations of 1 MiB and more with mmap, so a freed tensor's memory goes
    back to the system at once. By default glibc raises that threshold to the largest block
    freed so far (up to 32 MiB) and keeps later tensors of that size in its heaps, per thread,
    where they stay resident: conversion memory would grow with the model instead of staying at
    one tensor. No effect on other C libraries."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)


# The most the parameters made ahead of the writer may hold together (the one being written is
# held too); a larger parameter is made when the writer asks for it.
READ_AHEAD_BYTES = 512 * 2**20
# Of those, the most that may be new tensors (a value made by a transform); the others are views
# of the mapped HF files, whose pages are page cache. One made parameter is made ahead whatever
# its size.
MADE_AHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint item (``key`` at global ``offset``, of ``region`` shape with its
    prepended layer / expert axes) lies in parameter ``name``: a strided view of it."""

    key: str
    offset: tuple[int, ...]
    region: tuple[int, ...]
    name: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    def of(self, value: torch.Tensor) -> torch.Tensor:
        """This piece of the parameter's real ``value``, in the item's region shape."""
        view = value.as_strided(self.shape, self.stride, value.storage_offset() + self.storage_offset)
        return view.reshape(self.region)

    def of_rows(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """This piece of a parameter held as consecutive blocks of whole rows (``source_rows``):
        a view of the block it lies in when it is a run of whole rows, else a copy."""
        row = math.prod(rows[0].shape[1:])
        whole_rows = (
            self.shape[1:] == tuple(rows[0].shape[1:])
            and self.stride == torch.empty(self.shape, device="meta").stride()
            and self.storage_offset % row == 0
        )
        first, start = self.storage_offset // row, 0
        for block in rows:
            if whole_rows and start <= first and first + self.shape[0] <= start + block.shape[0]:
                return block[first - start : first - start + self.shape[0]].reshape(self.region)
            start += block.shape[0]
        return self.of(torch.cat(rows))


def parameter_pieces(sharded_state_dict: Any, names: dict[int, str]) -> list[Piece]:
    """Every ShardedTensor of a (factories applied) sharded state dict of a model whose data
    is one of its tensors, or a view of one, named in ``names`` (by ``id``)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    pieces = []
    for item in nested_values(sharded_state_dict):
        if not isinstance(item, ShardedTensor):
            continue
        data = item.data
        base = data._base if data._base is not None else data
        name = names.get(id(base))
        if name is None:
            raise WeightError(f"checkpoint key {item.key!r} holds a tensor that is no parameter of the model")
        pieces.append(
            Piece(
                key=item.key,
                offset=tuple(int(x) for x in item.global_offset),
                region=(1,) * item.prepend_axis_num + tuple(data.shape),
                name=name,
                shape=tuple(data.shape),
                stride=tuple(data.stride()),
                storage_offset=data.storage_offset() - base.storage_offset(),
            )
        )
    return pieces


# A parameter's value: a tensor made from its sources, or (``source_rows``) blocks of whole
# rows of the sources' memory-mapped bytes, written as they are.
Value = torch.Tensor | list[torch.Tensor]


class TensorProducer:
    """Makes the value of one Megatron parameter (single-process layout) from the HF files,
    keeping only the last one made (the writer asks for a parameter's pieces in a row)."""

    def __init__(
        self,
        bridge: ModelBridge,
        model: torch.nn.Module,
        checkpoint: Checkpoint,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        self.progress = progress
        self.weight_map = bridge.weight_map()
        self.checkpoint = checkpoint
        self.fp8_block = block_size(bridge.config.hf_passthrough)
        params = list(model_tensors(model))
        self.plan = {entry.megatron_name: entry for entry in plan_tensors(self.weight_map, params)}
        self.names = {id(tensor): name for name, tensor in params}
        self._last: tuple[str, Value] | None = None
        self._ahead: dict[str, Future[Value]] = {}  # in the writer's order
        self._failure: BaseException | None = None
        self._next: dict[str, str] = {}
        self._made: dict[str, int] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.stats = LoadStats()

    def check_sources(self) -> None:
        """Every HF tensor each parameter needs is there, with the right shape, and none is
        left unmapped, before any file is written (the model loader's own checks)."""
        check_sources(self.weight_map, list(self.plan.values()), self.checkpoint)

    def parameter(self, name: str) -> Value:
        """The value of parameter ``name``. While the writer writes it, the parameters after it
        in the writer's order are made in a second thread, as many as ``READ_AHEAD_BYTES``
        holds (``MADE_AHEAD_BYTES`` of them new tensors), so reading the sources overlaps
        writing the files."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._let_go()  # the previous one goes before the next is made
        made = self._ahead.pop(name, None)
        if made is None:  # asked out of the planned order: what was made ahead is let go
            self._drop_ahead()
            value = self._make(name)
        else:
            value = made.result()
        self._last = (name, value)
        self._make_ahead(name)
        return value

    def _make_ahead(self, name: str) -> None:
        if self._pool is None:
            return
        queued = sum(self.plan[n].nbytes for n in self._ahead)
        made = sum(self._made_bytes(n) for n in self._ahead)
        following = self._next.get(next(reversed(self._ahead), name))
        while following is not None and following not in self._ahead:
            size, new = self.plan[following].nbytes, self._made_bytes(following)
            if queued + size > READ_AHEAD_BYTES or (made and made + new > MADE_AHEAD_BYTES):
                break
            self._ahead[following] = self._pool.submit(self._make, following)
            queued, made = queued + size, made + new
            following = self._next.get(following)

    def _made_bytes(self, name: str) -> int:
        """The bytes of new memory parameter ``name``'s value takes: none when it is a view of
        the mapped sources (``source_rows``)."""
        if name not in self._made:
            entry = self.plan[name]
            self._made[name] = 0 if source_rows(entry, self.checkpoint) is not None else entry.nbytes
        return self._made[name]

    def read_ahead(self, order: list[tuple[str, tuple[int, ...]]]) -> None:
        """Make parameters ahead of the writer, which will ask for the items (key, offset) in
        ``order``, starting with the first."""
        names = [self.pieces[item].name for item in order if item in self.pieces]
        self._next = {a: b for a, b in zip(names, names[1:], strict=False) if a != b}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridgegen-read-ahead")
        if names:
            self._ahead[names[0]] = self._pool.submit(self._make, names[0])
            self._make_ahead(names[0])

    def stop_reading_ahead(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._let_go()
        self._drop_ahead()
        self._pool = None

    def _drop_ahead(self) -> None:
        """Let go of every value made ahead (waiting for the one being made)."""
        for name, made in self._ahead.items():
            if not made.cancelled() and made.exception() is None:
                self._let_go_of(name, made.result())
        self._ahead.clear()

    def _let_go(self) -> None:
        """Drop the value the writer is done with."""
        if self._last is not None:
            self._let_go_of(*self._last)
        self._last = None

    def _let_go_of(self, name: str, value: Value) -> None:
        """A value still in the HF files' pages hands them back (``fill_parameter`` did that
        for a value it made)."""
        if isinstance(value, list):
            release_sources(self.plan[name], self.checkpoint)

    def _make(self, name: str) -> Value:
        if self._failure is not None:  # nothing more is read once one has failed
            raise self._failure
        try:
            return self._make_one(name)
        except BaseException as exc:
            self._failure = exc
            raise

    def _make_one(self, name: str) -> Value:
        raise_if_a_config_check_failed()
        entry = self.plan[name]
        before = self.checkpoint.bytes_requested
        rows = source_rows(entry, self.checkpoint)
        value: Value
        if rows is not None:
            read_source_rows(entry, rows, self.checkpoint)
            value = rows
        else:
            value = torch.empty(entry.shape, dtype=entry.dtype)
            fill_parameter(entry, value, self.checkpoint, self.fp8_block)
        self.stats.tensors += 1
        if self.progress is not None:
            self.progress(1)
        self.stats.bytes_requested += self.checkpoint.bytes_requested - before
        return value

    def register(self, sharded_state_dict: Any) -> None:
        """Note, for every checkpoint item (key, global offset), which parameter it is a piece
        of and where: the writer names items by key and offset only."""
        self.pieces = {(p.key, p.offset): p for p in parameter_pieces(sharded_state_dict, self.names)}

    def resolve(self, key: str, offset: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
        """The bytes of checkpoint item ``key`` at global ``offset`` (shape ``size``)."""
        try:
            piece = self.pieces[(key, offset)]
        except KeyError:
            raise WeightError(
                f"the checkpoint writer asked for {key!r} at {offset}, which no parameter holds"
            ) from None
        start_config_checks()  # the writer has started: every import the conversion needs is done
        value = self.parameter(piece.name)
        part = piece.of(value) if isinstance(value, torch.Tensor) else piece.of_rows(value)
        return own_storage(part.reshape(size))


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """A contiguous view with a storage of its own bytes only, sharing the memory: the writer
    would otherwise copy a piece of a larger parameter (a fused fc1 half) before saving it."""
    if not view.is_contiguous() or view.untyped_storage().size() == view.nbytes:
        return view
    start = view.storage_offset() * view.element_size()
    storage = view.untyped_storage()[start : start + view.nbytes]
    return torch.empty(0, dtype=view.dtype).set_(storage, 0, view.shape, view.stride())


def lazy_save_strategy(producer: TensorProducer) -> Any:
    """The in-process torch_dist save strategy with tensors made when written: torch's
    synchronous FileSystemWriter calls the planner's ``resolve_data`` item by item (megatron-core's
    own writer would resolve every tensor first)."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    from bridgegen.runtime.megatron_checkpoint import in_process_save_strategy

    class LazyPlanner(MCoreSavePlanner):  # type: ignore[misc]
        def finish_plan(self, new_plan: Any) -> Any:
            plan = super().finish_plan(new_plan)
            # One thread, one file: the writer resolves the tensor items in the plan's order.
            producer.read_ahead(
                [
                    (item.index.fqn, tuple(int(x) for x in item.index.offset))
                    for item in plan.items
                    if item.type != WriteItemType.BYTE_IO
                ]
            )
            return plan

        def resolve_data(self, write_item: Any) -> Any:
            data = super().resolve_data(write_item)
            if isinstance(data, torch.Tensor) and data.is_meta:
                index = write_item.index
                data = producer.resolve(
                    index.fqn, tuple(int(x) for x in index.offset), tuple(write_item.tensor_data.chunk.sizes)
                )
            return data

    class LazySaveStrategy(in_process_save_strategy()):  # type: ignore[misc]
        planner_class = LazyPlanner

        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            producer.register(sharded_state_dict)
            try:
                super().save(sharded_state_dict, checkpoint_dir)
            finally:
                producer.stop_reading_ahead()

    return LazySaveStrategy("torch_dist", 1, thread_count=1)


def share_the_writing(rank: int, world_size: int) -> Callable[[Any], None]:
    """Mark each tensor of a sharded state dict as written by one rank: every rank holds the
    same single-process model, megatron-core writes only "main replicas" (``replica_id`` 0),
    so giving each rank the main replica of its share (largest first, to the least loaded
    rank) splits the bytes about evenly, and each rank reads only its share's sources."""

    def assign(state: Any) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        items = [x for x in nested_values(state) if isinstance(x, ShardedTensor | ShardedTensorFactory)]
        sizes = [int(torch.Size(x.data.shape).numel()) * x.data.element_size() for x in items]
        load = [0] * world_size
        for index in sorted(range(len(items)), key=lambda i: (-sizes[i], i)):
            owner = min(range(world_size), key=lambda r: (load[r], r))
            load[owner] += sizes[index]
            items[index].replica_id = 0 if owner == rank else 1

    return assign


def meta_model(bridge: ModelBridge, dtype: torch.dtype) -> torch.nn.Module:
    """The single-process megatron-core model, every parameter on the meta device."""
    with torch.device("meta"):
        model = bridge.build_model(dtype)
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


def stream_import(
    bridge: ModelBridge,
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    overwrite: bool = False,
    progress: bool = False,
    allow_lossy_casts: bool = True,
) -> LoadStats:
    """HF folder -> Megatron-LM style checkpoint (``megatron_checkpoint.save_megatron``'s
    layout), without a model in memory. Under torch.distributed every rank calls this and
    writes about 1/N of the bytes (its own ``__R_0.distcp``). Without ``allow_lossy_casts`` a
    source tensor that ``dtype`` cannot hold exactly is an error."""
    from bridgegen.runtime.megatron_checkpoint import save_megatron

    return_freed_buffers_to_the_system()
    model = meta_model(bridge, dtype)
    checkpoint = Checkpoint.open(hf_dir)
    # Each tensor is read whole, by one process, once: its pages leave the page cache after.
    checkpoint.read_once = True
    checkpoint.allow_lossy_casts = allow_lossy_casts
    producer = TensorProducer(bridge, model, checkpoint)
    producer.check_sources()
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    with progress_bar(progress, len(producer.plan), "import") as update:
        producer.progress = update
        save_megatron(
            model,
            bridge,
            out_dir,
            dtype=dtype,
            hf_source=hf_dir,
            overwrite=overwrite,
            sharded_strategy=lazy_save_strategy(producer),
            assign=share_the_writing(dist.get_rank(), world_size) if world_size > 1 else None,
        )
    return producer.stats


# ------------------------------------------------------------------------ export


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
    (``dist_checkpoint.verifying_reader``). megatron-core's sharded state dict of the model says
    where each parameter lies in which saved global tensor (a layer of a stacked key, the halves
    of a fused fc1, an expert); torch reads those regions from the chunks of whatever layout the
    checkpoint was saved at. A meta-device model gets new tensors; a real one (a rank's part of
    a parallel model) is filled in place, and the tensors yielded are its own."""
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from bridgegen.runtime.formats import dist_checkpoint
    from bridgegen.runtime.megatron_checkpoint import _check_keys, sharded_state_dict

    tensors = dict(model_tensors(model))
    names = {id(tensor): name for name, tensor in tensors.items()}
    request = sharded_state_dict([model], per_layer_keys)
    if check_keys:
        _check_keys(request, folder)
    apply_factories(request)
    pieces: dict[str, list[Piece]] = {}
    for piece in parameter_pieces(request, names):
        pieces.setdefault(piece.name, []).append(piece)
    sizes = [
        (name, tensor.numel() * tensor.element_size())
        for name, tensor in tensors.items()
        if only is None or name in only
    ]
    # The metadata is read once: torch reads .metadata on every load otherwise, and a large
    # model's index is big and its batches many.
    metadata = dist_checkpoint.verifying_reader(folder).read_metadata()
    items = dist_checkpoint.MappedItems(folder)

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
            plans = [(piece, region_reads(metadata, piece)) for piece in pieces[name]]
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
            reader = dist_checkpoint.verifying_reader(folder)  # one per batch: batches are read in parallel
            reader.read_metadata = lambda *args, **kwargs: metadata
            planner = _region_planner(by_torch)
            try:
                with first_error_of_torch_checkpoint():
                    _load_state_dict({}, reader, planner=planner, no_dist=True)
                reader.checks.finish()
            except Exception:
                # A failed CRC check raised inside torch's zip reader comes out wrapped.
                problem = reader.checks.problem()
                if problem is not None:
                    raise problem from None
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


def stream_export(
    checkpoint_dir: Any,
    out_dir: Any,
    *,
    iteration: str | None = None,
    family: str | None = None,
    hf_config: Any = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    batch_bytes: int = 256 * 2**20,
    progress: bool = False,
) -> Any:
    """Megatron checkpoint (any layout, any writer) -> HF folder, without a model in memory:
    the files are planned from a meta-device model, then each batch of parameters (at most
    ``batch_bytes``, or one parameter) is read, converted and streamed into the safetensors
    shards."""
    import torch.distributed as dist

    from bridgegen.runtime.formats import megatron_lm
    from bridgegen.runtime.megatron_checkpoint import bridge_for_checkpoint

    return_freed_buffers_to_the_system()
    found = megatron_lm.find_checkpoint(checkpoint_dir, iteration)
    bridge, saved_dtype = bridge_for_checkpoint(found.path, family=family, hf_config=hf_config)
    model = meta_model(bridge, saved_dtype)
    if dist.is_initialized() and dist.get_world_size() > 1:
        return _export_on_ranks(
            bridge,
            model,
            found.path,
            out_dir,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
        )
    with progress_bar(progress, sum(1 for _ in model_tensors(model)), "export") as update:
        values = checkpoint_values(
            model,
            found.path,
            per_layer_keys=bridge.per_layer_keys,
            batch_bytes=batch_bytes,
            progress=update,
        )
        return bridge.export_hf(
            model, out_dir, overwrite=overwrite, dtype=dtype, max_shard_bytes=max_shard_bytes, values=values
        )


def owned_parameters(bridge: ModelBridge, model: torch.nn.Module, rank: int, world_size: int) -> set[str]:
    """This rank's share of an export: a contiguous run of parameters holding about 1/N of the
    bytes, never splitting the experts that are stacked into one HF tensor."""
    units: list[tuple[list[str], int]] = []
    last_group: tuple[str, ...] | None = None
    for entry in plan_tensors(bridge.weight_map(), model_tensors(model)):
        group = entry.hf_names if entry.matched.rule.hf_stacked_experts else None
        name, size = entry.megatron_name, entry.nbytes
        if group is not None and group == last_group:
            units[-1][0].append(name)
            units[-1] = (units[-1][0], units[-1][1] + size)
        else:
            units.append(([name], size))
        last_group = group
    total = sum(size for _, size in units) or 1
    owned: set[str] = set()
    done = 0
    for names, size in units:
        if min(world_size - 1, done * world_size // total) == rank:
            owned.update(names)
        done += size
    return owned


def _export_on_ranks(
    bridge: ModelBridge,
    model: torch.nn.Module,
    folder: Any,
    out_dir: Any,
    *,
    dtype: str | torch.dtype | None,
    overwrite: bool,
    max_shard_bytes: int,
) -> Any:
    """The streaming export on N ranks: rank 0 plans the HF files and writes their headers;
    every rank reads its share of the parameters and writes their HF tensors into those files;
    rank 0 writes the index and moves the folder into place."""
    import itertools
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from bridgegen.runtime.convert import parse_dtype
    from bridgegen.runtime.distributed import _commit
    from bridgegen.runtime.folders import shared_temp_dir
    from bridgegen.runtime.safetensors_io import PlannedFiles, file_plan, stream_tensors
    from bridgegen.runtime.weights import iter_hf_from_full

    saved: torch.dtype = getattr(model, "config").params_dtype  # noqa: B009 - GPTModel has a config
    target = parse_dtype(dtype)  # None: every tensor keeps its own dtype
    weight_map = bridge.weight_map()
    rank = dist.get_rank()
    out = Path(out_dir)
    tmp = shared_temp_dir(out, overwrite)
    try:
        planned = bridge.planned_hf_tensors(model, target)
        source, carried = bridge.carried_tensors(dtype=target)
        holder: list[Any] = [None]
        if rank == 0:
            holder[0] = file_plan(planned + carried, max_shard_bytes)
            holder[0].create(tmp)
        dist.broadcast_object_list(holder, src=0)
        output = PlannedFiles(tmp, holder[0])
        owned = owned_parameters(bridge, model, rank, dist.get_world_size())
        values = checkpoint_values(model, folder, per_layer_keys=bridge.per_layer_keys, only=owned)
        converted = iter_hf_from_full(weight_map, values, dtype=target)
        passed = stream_tensors(source, carried) if rank == 0 and source is not None else iter(())
        for name, tensor in itertools.chain(converted, passed):
            output.write(name, output.target(name), tensor)
        output.close()
        dist.barrier()
        if rank == 0:
            _commit(bridge, tmp, out, holder[0], target or saved, overwrite)
        dist.barrier()
    except BaseException:
        if rank == 0:  # the temp folder is shared; see distributed.export_hf
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
