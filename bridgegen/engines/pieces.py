"""What the streaming engines share: where each checkpoint item lies in a model's parameters
(``Piece``), and memory handed back to the system as soon as a tensor is freed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bridgegen.bridge.errors import WeightError


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

def own_storage(view: torch.Tensor) -> torch.Tensor:
    """A contiguous view with a storage of its own bytes only, sharing the memory: the writer
    would otherwise copy a piece of a larger parameter (a fused fc1 half) before saving it."""
    if not view.is_contiguous() or view.untyped_storage().size() == view.nbytes:
        return view
    start = view.storage_offset() * view.element_size()
    storage = view.untyped_storage()[start : start + view.nbytes]
    return torch.empty(0, dtype=view.dtype).set_(storage, 0, view.shape, view.stride())
