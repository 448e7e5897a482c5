"""Streaming import: HF folder -> Megatron checkpoint without a model in memory.

megatron-core builds the model on the meta device (no storage), so its own
``sharded_state_dict()`` stays the authority on every key, global shape and offset; torch's
distributed-checkpoint file writer then asks for one tensor at a time (``resolve_data``), and
only then is that tensor made, from memory-mapped safetensors through the spec's transform.
Memory beyond the process is one Megatron parameter and its HF sources' pages, whatever the
model's size. The files are megatron-core's torch_dist format, written by torch's own writer,
with the common state and ``metadata.json`` written by megatron-core as for any save.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from bridgegen.bridge.config_checks import raise_if_a_config_check_failed, start_config_checks
from bridgegen.bridge.errors import WeightError
from bridgegen.engines.checkpoint import save_megatron
from bridgegen.engines.pieces import own_storage, parameter_pieces, return_freed_buffers_to_the_system
from bridgegen.engines.progress import progress_bar, share
from bridgegen.engines.weights import (
    LoadStats,
    check_sources,
    fill_parameter,
    read_source_rows,
    release_sources,
    source_rows,
)
from bridgegen.formats.fp8 import block_size
from bridgegen.formats.megatron_checkpoint import in_process_save_strategy
from bridgegen.formats.safetensors import Checkpoint
from bridgegen.megatron.build import meta_model
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.weight_map import model_tensors, plan_tensors

# The most the parameters made ahead of the writer may hold together (the one being written is
# held too); a larger parameter is made when the writer asks for it.
READ_AHEAD_BYTES = 512 * 2**20

# Of those, the most that may be new tensors (a value made by a transform); the others are views
# of the mapped HF files, whose pages are page cache. One made parameter is made ahead whatever
# its size.
MADE_AHEAD_BYTES = 64 * 2**20

# A parameter's value: a tensor made from its sources, or (``source_rows``) blocks of whole
# rows of the sources' memory-mapped bytes, written as they are.
Value = torch.Tensor | list[torch.Tensor]

class TensorProducer:
    """Makes the value of one Megatron parameter (single-process layout) from the HF files,
    keeping only the last one made (the writer asks for a parameter's pieces in a row)."""

    def __init__(
        self,
        bridge: Conversion,
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
        self.used: set[str] = set()  # the HF tensors read (stats.hf_tensors_used counts them)
        # Told how many parameters this process makes, once the writer's plan says (a bar's total).
        self.planned: Callable[[int], object] | None = None

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
        if self.planned is not None:  # this process's share (all of it, in one process)
            self.planned(len(set(names)))
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
        self.used.update(entry.hf_names)
        self.stats.hf_tensors_used = len(self.used)
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

def lazy_save_strategy(producer: TensorProducer) -> Any:
    """The in-process torch_dist save strategy with tensors made when written: torch's
    synchronous FileSystemWriter calls the planner's ``resolve_data`` item by item (megatron-core's
    own writer would resolve every tensor first)."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

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

def stream_import(
    bridge: Conversion,
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    overwrite: bool = False,
    progress: bool = False,
    allow_lossy_casts: bool = True,
) -> LoadStats:
    """HF folder -> Megatron-LM style checkpoint (``engines.checkpoint.save_megatron``'s
    layout), without a model in memory. Under torch.distributed every rank calls this and
    writes about 1/N of the bytes (its own ``__R_0.distcp``). Without ``allow_lossy_casts`` a
    source tensor that ``dtype`` cannot hold exactly is an error."""
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
    what = share("import", dist.get_rank() if world_size > 1 else 0, world_size)
    with progress_bar(progress, len(producer.plan), what) as bar:
        producer.progress = bar
        producer.planned = bar.set_total if bar is not None else None
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
