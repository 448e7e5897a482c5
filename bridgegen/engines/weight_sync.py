"""Weight sync: a live megatron-core model's weights as whole HF tensors, inside the caller's
training job (an RL framework refreshing its inference engine every few steps).

The caller owns torch.distributed and megatron-core's parallel state (TP, PP, VPP, EP,
expert-TP); this module only uses them. ``WeightExport(conversion, model_chunks)`` plans once
(collectively: every rank says what its pipeline stage holds) and then each call

    for name, tensor in export(destinations={0}):  # on every rank
        ...

moves the bytes. For each Megatron tensor of one pipeline stage, in HF order:

* its tensor-parallel shards are put together with one ``all_gather`` on the TP group (expert
  tensors on the expert-TP group), by the transform's own reassembly (``gather_tp_shards``:
  fused qkv shards concatenate, gate/up shards each hold gate and up halves);
* one layer's experts are gathered over the expert-parallel group in one ``all_gather`` of all
  their tensors packed into one buffer;
* a run of whole tensors of one stage (a bucket of at most ``bucket_bytes``) is packed into
  one buffer and broadcast over the pipeline group from that stage.

The whole Megatron tensors then become HF tensors by the plan (``iter_hf_from_full``).
Nothing global is changed: no process group is created, no torch function patched, no RNG
used, grad mode left alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import WeightKind
from bridgegen.engines.weights import iter_hf_from_full
from bridgegen.plan.conversion import Conversion
from bridgegen.plan.inference_tp import HFSlice, matched_slice
from bridgegen.plan.sync import SyncTensor, SyncUnit, buckets, packed_offsets, renumber_expert
from bridgegen.plan.transforms import gather_tp_shards, tp_partition_dim
from bridgegen.plan.weight_map import ExportChecks, MatchedTensor, WeightMap, model_tensors

Manifest = list[tuple[str, torch.Size, torch.dtype]]


@dataclass(frozen=True)
class _Held:
    """One of this rank's tensors: the dim megatron-core splits it on over its tensor-parallel
    group (None: whole here), and the kind that says how the whole tensor is put together."""

    tensor: torch.Tensor
    dim: int | None
    kind: WeightKind


@dataclass(frozen=True)
class _Groups:
    """The caller's process groups (megatron-core's parallel state) and this rank's place."""

    tp: Any
    tp_size: int
    etp: Any
    etp_size: int
    ep: Any
    ep_size: int
    ep_rank: int
    pp: Any
    pp_size: int
    pp_rank: int
    pp_ranks: list[int]  # global ranks of this rank's pipeline group, by stage

    @classmethod
    def current(cls) -> _Groups:
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_group()
        if isinstance(pp, list):
            raise WeightError("weight sync: several pipeline groups per rank are not supported")
        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            etp=ps.get_expert_tensor_parallel_group(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            ep=ps.get_expert_model_parallel_group(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            pp=pp,
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_ranks=list(dist.get_process_group_ranks(pp)),
        )


def chunk_layer_offset(model: torch.nn.Module, index: int, count: int, what: str) -> int:
    """The global number of model chunk ``index``'s first layer (of ``count`` chunks: its
    virtual pipeline stage's offset, by megatron-core's own rule); ``what`` names the caller in
    the error for a chunk that is no megatron-core model."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = getattr(model, "config", None)
    if config is None:
        raise WeightError(
            f"{what}: model chunk {index} ({type(model).__name__}, after unwrapping .module) "
            "has no megatron-core config: not a megatron-core model"
        )
    vp_stage = getattr(model, "vp_stage", None)
    if vp_stage is None and count > 1:
        vp_stage = index
    return int(get_transformer_layer_offset(config, vp_stage=vp_stage))


def unwrap(module: Any) -> torch.nn.Module:
    """The megatron-core model inside wrappers that hold it as ``.module`` (Megatron DDP,
    Float16Module, torch DDP); a bridgegen ``ModelChunk``'s model."""
    if not isinstance(module, torch.nn.Module) and isinstance(
        getattr(module, "model", None), torch.nn.Module
    ):
        module = module.model
    while isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    if not isinstance(module, torch.nn.Module):
        raise WeightError(
            f"weight sync: a model chunk must be a torch.nn.Module, got {type(module).__name__}"
        )
    return module


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _pack(tensors: Sequence[torch.Tensor], specs: Sequence[SyncTensor], device: torch.device) -> torch.Tensor:
    offsets, size = packed_offsets(specs)
    buffer = torch.empty(size, dtype=torch.uint8, device=device)
    for tensor, spec, offset in zip(tensors, specs, offsets, strict=True):
        buffer[offset : offset + spec.nbytes].copy_(_as_bytes(tensor))
    return buffer


def _all_gather_packed(
    tensors: Sequence[torch.Tensor], specs: Sequence[SyncTensor], group: Any, size: int, device: torch.device
) -> list[list[torch.Tensor]]:
    """Every rank's ``tensors`` (alike in shape on every rank of ``group``): packed into one
    buffer, one all_gather, then views of each rank's part, in rank order."""
    packed = _pack(tensors, specs, device)
    gathered = torch.empty(size * packed.numel(), dtype=torch.uint8, device=packed.device)
    dist.all_gather_into_tensor(gathered, packed, group=group)
    return [_unpack(part, specs) for part in gathered.chunk(size)]


def _unpack(buffer: torch.Tensor, specs: Sequence[SyncTensor]) -> list[torch.Tensor]:
    """Views of ``buffer`` as the tensors ``_pack`` put there."""
    offsets, _ = packed_offsets(specs)
    return [
        buffer[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape)
        for spec, offset in zip(specs, offsets, strict=True)
    ]


# The whole tensors one sync step moves and holds at once, unless one tensor is larger.
DEFAULT_BUCKET_BYTES = 256 * 2**20


class WeightExport:
    """A live model's weights as whole HF tensors, planned once and reused for every sync.

    ``model_chunks``: this rank's model (a list: one chunk per virtual pipeline stage, in
    order), each a megatron-core GPTModel, possibly wrapped (Megatron DDP / Float16Module:
    unwrapped through ``.module``). Creating it is collective: every rank of the job creates
    it at the same point. ``bucket_bytes`` bounds the whole tensors moved and held at once; a
    tensor (one layer's experts, for MoE layers) larger than it is an error. By default it is
    ``DEFAULT_BUCKET_BYTES``, or the largest such tensor where that is larger (a Llama-3-8B
    embedding is ~1 GB in bf16).
    """

    def __init__(
        self,
        conversion: Conversion,
        model_chunks: Sequence[torch.nn.Module] | torch.nn.Module,
        *,
        bucket_bytes: int | None = None,
    ) -> None:
        if bucket_bytes is not None and (not isinstance(bucket_bytes, int) or bucket_bytes < 1):
            raise WeightError(f"weight sync: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        if not chunks:
            raise WeightError("weight sync: no model chunks given")
        self.conversion = conversion
        self.bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        self._weight_map = conversion.weight_map()
        self._groups = _Groups.current()
        models = [unwrap(chunk) for chunk in chunks]
        self._device = next((t.device for m in models for _, t in model_tensors(m)), torch.device("cpu"))
        # This stage's units and, for each, this rank's tensors of it.
        mine: list[SyncUnit] = []
        self._held: list[list[_Held]] = []
        # The tensors each sync checks instead of moving, and the tensors their copies repeat.
        self._checked: list[tuple[str, torch.Tensor, MatchedTensor]] = []
        self._shared_sources = {rule.shares_hf_with for rule in self._weight_map.rules if rule.shares_hf_with}
        failure: Exception | None = None
        try:
            for index, model in enumerate(models):
                units, held = self._plan_chunk(index, model, len(models))
                mine += units
                self._held += held
        except Exception as exc:  # noqa: BLE001 - said to every rank before any raises
            failure = exc
        self._units, self._owned = self._agree(mine, len(models), failure)
        self._hf_counts: list[int] = []
        self._manifest: Manifest = []
        # Each HF tensor's Megatron tensor and rule (for inference_tp slices).
        self._matched: dict[str, MatchedTensor] = {}
        for unit in self._units:
            for tensor in unit.tensors:
                matched = self._weight_map.match(tensor.name, unit.layer_offset)
                for hf_name in (*matched.hf_names(), *matched.hf_copies()):
                    self._matched[hf_name] = matched
            meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in unit.tensors]
            named = [(name, tensor.shape, tensor.dtype) for name, tensor in self._hf_of(unit, meta)]
            self._hf_counts.append(len(named))
            self._manifest += named
        self._firsts = [0]  # each unit's first HF tensor in the manifest
        for count in self._hf_counts[:-1]:
            self._firsts.append(self._firsts[-1] + count)
        if bucket_bytes is None:
            largest = max((packed_offsets(unit.tensors)[1] for unit in self._units), default=0)
            self.bucket_bytes = max(self.bucket_bytes, largest)
        self._check_bucket()
        self._buckets = buckets(self._units, self.bucket_bytes)

    # ------------------------------------------------------------------ planning

    def _plan_chunk(
        self, index: int, model: torch.nn.Module, count: int
    ) -> tuple[list[SyncUnit], list[list[_Held]]]:
        layer_offset = chunk_layer_offset(model, index, count, "weight sync")
        config = model.config
        g = self._groups
        experts = int(getattr(config, "num_moe_experts", None) or 0)
        per_rank = experts // g.ep_size
        units: list[SyncUnit | None] = []
        held: list[list[_Held]] = []
        # Per MoE layer: its unit's index and this rank's expert tensors (name, local number, whole shape, dtype).
        layers: dict[int | None, tuple[int, list[tuple[str, int, tuple[int, ...], torch.dtype]]]] = {}
        for name, tensor in model_tensors(model):
            if self._weight_map.is_tied_output(name):
                continue  # the last stage's copy of a tied embedding: HF has no tensor of its own
            try:
                matched = self._weight_map.match(name, layer_offset)
            except WeightError as exc:
                raise WeightError(f"weight sync, model chunk {index}: {exc}") from None
            if not matched.exported or matched.rule.megatron_name in self._shared_sources:
                self._checked.append((name, tensor, matched))
            if not matched.exported:
                continue  # checked on each sync (_check_unexported), never moved
            expert = matched.expert is not None
            dim = self._split_dim(name, tensor, matched.rule.kind, g.etp_size if expert else g.tp_size)
            shape = list(tensor.shape)
            if dim is not None:
                shape[dim] *= g.etp_size if expert else g.tp_size
            if not expert:
                units.append(
                    SyncUnit(g.pp_rank, index, layer_offset, (SyncTensor(name, tuple(shape), tensor.dtype),))
                )
                held.append([_Held(tensor, dim, matched.rule.kind)])
                continue
            if per_rank * g.ep_size != experts or not 0 <= (matched.expert or 0) < per_rank:
                raise WeightError(
                    f"weight sync, model chunk {index}: Megatron {name!r} is local expert {matched.expert}, "
                    f"but the config's {experts} experts over expert parallel size {g.ep_size} make {per_rank} per rank"
                )
            slot, entries = layers.setdefault(matched.layer, (len(units), []))
            if slot == len(units):
                units.append(None)
                held.append([])
            entries.append((name, int(matched.expert or 0), tuple(shape), tensor.dtype))
            held[slot].append(_Held(tensor, dim, matched.rule.kind))
        for slot, entries in layers.values():
            tensors = tuple(
                SyncTensor(renumber_expert(self._weight_map, name, rank * per_rank + local), shape, dtype)
                for rank in range(g.ep_size)
                for name, local, shape, dtype in entries
            )
            units[slot] = SyncUnit(g.pp_rank, index, layer_offset, tensors, experts=True)
        return [unit for unit in units if unit is not None], held

    def _split_dim(self, name: str, tensor: torch.Tensor, kind: WeightKind, size: int) -> int | None:
        """The dim ``tensor`` is split on over its group of ``size``: the spec's kind says it (the
        slices ``load_hf`` reads); megatron-core's ``tensor_model_parallel`` / ``partition_dim``
        attributes, where they say the tensor is split, must agree. (megatron-core sets them on
        weights only when it initialises them: not with ``perform_initialization=False``, and
        Megatron-LM then fills in ``tensor_model_parallel=False`` for every parameter.)"""
        if size == 1:
            return None
        expected = tp_partition_dim(kind)
        if getattr(tensor, "tensor_model_parallel", False):
            dim = int(getattr(tensor, "partition_dim", -1))
            if dim != expected:
                held = "whole on every rank" if expected is None else f"split on dim {expected}"
                raise WeightError(
                    f"weight sync: Megatron {name!r}: megatron-core splits it on dim {dim} over tensor "
                    f"parallelism, but the {self._weight_map.config.family} spec's {kind.value} kind has it {held}"
                )
        return expected

    def _agree(
        self, mine: list[SyncUnit], count: int, failure: Exception | None
    ) -> tuple[list[SyncUnit], list[list[_Held] | None]]:
        """Every rank's plan, in sync order (by virtual stage, then pipeline stage), with this
        rank's tensors of the units its stage owns. One object all-gather over the job, so that
        a rank that cannot plan stops every rank (none is left waiting in a collective)."""
        g = self._groups
        problem = None
        if failure is not None:
            lines = str(failure).strip().splitlines() or [type(failure).__name__]
            problem = (
                lines[0] if isinstance(failure, WeightError) else f"{type(failure).__name__}: {lines[0]}"
            )
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (g.pp_rank, count, mine, problem))
        if failure is not None:
            raise failure
        for rank, (_, _, _, said) in enumerate(everyone):
            if said is not None:
                raise WeightError(f"{said} (on rank {rank})")
        stages: dict[int, tuple[int, list[SyncUnit]]] = {}
        for rank, (stage, chunks, units, _) in enumerate(everyone):
            if stages.setdefault(stage, (chunks, units)) != (chunks, units):
                raise WeightError(
                    f"weight sync: rank {rank} holds another model than the other ranks of pipeline stage {stage}"
                )
        if sorted(stages) != list(range(g.pp_size)) or len({chunks for chunks, _ in stages.values()}) != 1:
            raise WeightError("weight sync: the pipeline stages hold different numbers of model chunks")
        order: list[SyncUnit] = []
        owned: list[list[_Held] | None] = []
        for chunk in range(count):
            for stage in range(g.pp_size):
                for index, unit in enumerate(stages[stage][1]):
                    if unit.chunk == chunk:
                        order.append(unit)
                        owned.append(self._held[index] if stage == g.pp_rank else None)
        return order, owned

    def _check_bucket(self) -> None:
        """Every unit must fit in one bucket; the largest one is named if it does not."""
        sizes = [packed_offsets(unit.tensors)[1] for unit in self._units]
        largest = max(range(len(sizes)), key=sizes.__getitem__, default=None)
        if largest is None or sizes[largest] <= self.bucket_bytes:
            return
        unit, start = self._units[largest], self._firsts[largest]
        names = [name for name, _, _ in self._manifest[start : start + self._hf_counts[largest]]]
        shown = ", ".join(repr(n) for n in names[:3]) + (
            f" and {len(names) - 3} more" if len(names) > 3 else ""
        )
        what = (
            "the experts of one layer, moved in one piece"
            if unit.experts
            else f"Megatron {unit.tensors[0].name!r} of pipeline stage {unit.stage}"
        )
        raise WeightError(
            f"weight sync: bucket_bytes {self.bucket_bytes} is smaller than the largest tensor, HF {shown} "
            f"({sizes[largest]} bytes; {what}): pass bucket_bytes >= {sizes[largest]}"
        )

    def _hf_of(self, unit: SyncUnit, whole: Sequence[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_hf_from_full(
            self._weight_map,
            zip((t.name for t in unit.tensors), whole, strict=True),
            layer_offset=unit.layer_offset,
        )

    # ------------------------------------------------------------------ syncing

    def manifest(self, *, inference_tp: tuple[int, int] | None = None) -> Manifest:
        """Every HF tensor a sync yields, (name, shape, dtype) in yield order; the same on every
        rank. With ``inference_tp``, the shapes of the slices that sync yields."""
        if inference_tp is None:
            return list(self._manifest)
        out: Manifest = []
        for (name, shape, dtype), part in zip(self._manifest, self._slices(inference_tp), strict=True):
            if part is not None:
                sizes = list(shape)
                sizes[part.dim] = part.stop - part.start
                shape = torch.Size(sizes)
            out.append((name, shape, dtype))
        return out

    def _slices(self, inference_tp: tuple[int, int]) -> list[HFSlice | None]:
        """The slice of each manifest tensor that inference TP rank k of K keeps
        (``plan.inference_tp``); refused before any tensor moves."""
        if (
            not isinstance(inference_tp, tuple)
            or len(inference_tp) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in inference_tp)
            or not 0 <= inference_tp[0] < inference_tp[1]
        ):
            raise WeightError(
                f"weight sync: inference_tp must be (rank, size) with 0 <= rank < size, got {inference_tp!r}"
            )
        k, count = inference_tp
        heads = self._weight_map.layout()
        try:
            return [
                matched_slice(self._matched[name], name, tuple(shape), k, count, heads)
                for name, shape, _ in self._manifest
            ]
        except WeightError as exc:
            raise WeightError(f"weight sync: {exc}") from None

    @property
    def weight_map(self) -> WeightMap:
        return self._weight_map

    def __call__(
        self,
        *,
        destinations: set[int] | None = None,
        cpu: bool = False,
        inference_tp: tuple[int, int] | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, whole HF tensor) in manifest order. Collective: every rank calls it with the
        same ``destinations`` and runs the iterator to its end. ``destinations`` (global ranks;
        None: all) receive every tensor, the other ranks take part and yield nothing. Tensors
        stay on the parameters' device (``cpu``: moved to the CPU); they may be views of the
        model's parameters or of buffers of this sync, so copy what must outlive the next step.

        ``inference_tp=(k, K)``: each tensor is only the slice that an inference engine's
        tensor-parallel rank k of K keeps of it (``plan.inference_tp``: vLLM's split), a view
        of the whole tensor (``cpu``: only the slice is copied). The ranks of this job move
        the same bytes among themselves; what is yielded is about 1/K of the model."""
        world = dist.get_world_size()
        if destinations is not None:
            wrong = sorted(r for r in destinations if not isinstance(r, int) or not 0 <= r < world)
            if wrong:
                raise WeightError(
                    f"weight sync: destinations {wrong} are not ranks of this job (world size {world})"
                )
        self._check_unexported()
        receives = destinations is None or dist.get_rank() in destinations
        # A pipeline group with no destination in it need not move tensors between its stages.
        pipeline = destinations is None or any(rank in destinations for rank in self._groups.pp_ranks)
        slices = None if inference_tp is None else self._slices(inference_tp)
        return self._sync(receives, pipeline, cpu, slices)

    def _check_unexported(self) -> None:
        """The tensors HF holds no tensor of their own for (a constant one; a copy of another
        one's HF tensor), checked on every rank against what each rank holds: a copy and the
        tensor it repeats are split alike, so local shards decide. Where the spec has such
        tensors, every rank learns whether any failed (one all_reduce) before raising."""
        rules = self._weight_map.rules
        if not any(rule.kind is WeightKind.constant or rule.shares_hf_with for rule in rules):
            return
        failure: WeightError | None = None
        try:
            checks = ExportChecks(self._weight_map)
            for name, tensor, matched in self._checked:
                checks.offer(name, tensor, matched)
            checks.finish()
        except WeightError as exc:
            failure = exc
        flag = torch.tensor([0 if failure is None else 1], device=self._device)
        dist.all_reduce(flag)
        if failure is not None:
            raise WeightError(f"weight sync: {failure}")
        if int(flag.item()):
            raise WeightError(
                "weight sync: another rank found a tensor that differs from what the spec fixes"
            )

    def _sync(
        self, receives: bool, pipeline: bool, cpu: bool, slices: list[HFSlice | None] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        g = self._groups
        for bucket in self._buckets:
            units = [self._units[i] for i in bucket]
            owner = units[0].stage
            whole: list[list[torch.Tensor]] | None = None
            if owner == g.pp_rank:
                whole = self._bucket_whole(bucket)
            if g.pp_size > 1 and pipeline:
                whole = self._broadcast(units, owner, whole)
            if not receives:
                continue
            assert whole is not None
            for index, unit, tensors in zip(bucket, units, whole, strict=True):
                if cpu and slices is None:
                    tensors = [t.cpu() for t in tensors]
                position = self._firsts[index]
                for name, tensor in self._hf_of(unit, tensors):
                    expected = self._manifest[position]
                    if (name, tensor.shape, tensor.dtype) != expected:
                        raise WeightError(
                            f"weight sync: made HF {name!r} {list(tensor.shape)} {tensor.dtype} where the manifest has "
                            f"{expected[0]!r} {list(expected[1])} {expected[2]}"
                        )
                    if slices is not None:
                        part = slices[position]
                        if part is not None:
                            tensor = tensor.narrow(part.dim, part.start, part.stop - part.start)
                        if cpu:
                            tensor = tensor.cpu()
                    position += 1
                    yield name, tensor

    def _bucket_whole(self, bucket: list[int]) -> list[list[torch.Tensor]]:
        """The whole tensors of a bucket's units, on a rank of the stage that owns them: the
        tensor-parallel shards of all of them put together with one all_gather on the TP group
        (and one on the expert-TP group for experts), then the experts of all its MoE layers
        with one all_gather over the expert-parallel group. Collectives per sync are bounded by
        the buckets, not by tensors, experts or layers."""
        g = self._groups
        shards: dict[tuple[int, int], torch.Tensor] = {}
        for experts, group, size in ((False, g.tp, g.tp_size), (True, g.etp, g.etp_size)):
            split = [
                (index, position, held)
                for index in bucket
                if self._units[index].experts is experts
                for position, held in enumerate(self._owned[index] or [])
                if held.dim is not None and size > 1
            ]
            if split:
                shards.update(self._gather_split(split, group, size))
        whole = [
            [
                shards.get((index, position), held.tensor.detach())
                for position, held in enumerate(self._owned[index] or [])
            ]
            for index in bucket
        ]
        moe = [slot for slot, index in enumerate(bucket) if self._units[index].experts]
        if g.ep_size == 1 or not moe:
            return whole
        # Each rank packs its experts of every MoE layer of the bucket; one all_gather; each
        # layer's tensors then run rank by rank, as its unit lists them.
        specs = [spec for slot in moe for spec in self._units[bucket[slot]].tensors[: len(whole[slot])]]
        per_rank = _all_gather_packed(
            [tensor for slot in moe for tensor in whole[slot]], specs, g.ep, g.ep_size, self._device
        )
        start = 0
        for slot in moe:
            count = len(whole[slot])
            whole[slot] = [tensor for rank in per_rank for tensor in rank[start : start + count]]
            start += count
        return whole

    def _gather_split(
        self, split: list[tuple[int, int, _Held]], group: Any, size: int
    ) -> dict[tuple[int, int], torch.Tensor]:
        """The whole tensors of the shards in ``split`` ((unit index, position, held)): this
        rank's shards packed into one buffer, one all_gather over ``group``, each tensor put
        together by its kind (``gather_tp_shards``)."""
        locals_ = [held.tensor.detach() for _, _, held in split]
        specs = [SyncTensor(str(n), tuple(t.shape), t.dtype) for n, t in enumerate(locals_)]
        per_rank = _all_gather_packed(locals_, specs, group, size, locals_[0].device)
        return {
            (index, position): gather_tp_shards(held.kind, [rank[n] for rank in per_rank])
            for n, (index, position, held) in enumerate(split)
        }

    def _broadcast(
        self, units: list[SyncUnit], owner: int, whole: list[list[torch.Tensor]] | None
    ) -> list[list[torch.Tensor]]:
        """One bucket's whole tensors from the stage that owns them to every stage."""
        g = self._groups
        specs = [tensor for unit in units for tensor in unit.tensors]
        if whole is not None:
            buffer = _pack([t for tensors in whole for t in tensors], specs, self._device)
        else:
            buffer = torch.empty(packed_offsets(specs)[1], dtype=torch.uint8, device=self._device)
        dist.broadcast(buffer, src=g.pp_ranks[owner], group=g.pp)
        if whole is not None:
            return whole
        flat = iter(_unpack(buffer, specs))
        return [[next(flat) for _ in unit.tensors] for unit in units]
