"""The one way bridgegen reads a pickle from an input: an unpickler that resolves only the
classes those files legitimately hold, so a crafted checkpoint cannot run code.

A pickle names every class or function it needs ("module.name") and the unpickler imports and
calls them: whoever wrote the file chooses what runs. Checkpoints hold pickles in two places,
and both go through ``RestrictedUnpickler``:

- torch DCP's ``.metadata`` index (torch reads it with a plain ``pickle.load``);
- megatron-core's common state (``common.pt`` up to 0.18, the ``common_state`` object in the
  ``.distcp`` files from 0.19), which holds Megatron-LM's ``args``.

``.distcp`` tensor items are read by torch with ``weights_only=True`` or by our own
single-purpose reader (``dist_items``). Anything not listed below is refused with one line
naming the file and the class.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from bridgegen.bridge.errors import WeightError

# Megatron-LM's args and common state hold members of enums of these megatron-core modules
# (Megatron-LM d98e8a64: args.attention_backend AttnBackend, args.model_type ModelType,
# InferenceCudaGraphScope / CudaGraphModule; the common state's rerun_state_machine RerunMode /
# RerunState). They are never imported: a member is kept as its saved value (``SavedEnum``), so
# the same file reads under any megatron-core version (0.19's InferenceCudaGraphScope is missing
# from 0.16) and naming a module cannot make us import it.
MEGATRON_ENUM_MODULES = frozenset(
    {
        "megatron.core.enums",
        "megatron.core.transformer.enums",
        "megatron.core.rerun_state_machine",
    }
)


@dataclass(frozen=True)
class SavedEnum:
    """A member of an enum of megatron-core, by its class's qualified name and saved value."""

    enum_class: str
    value: Any

    def __str__(self) -> str:
        return f"{self.enum_class}({self.value!r})"


def _saved_enum(qualified_name: str) -> Callable[[Any], SavedEnum]:
    def member(value: Any) -> SavedEnum:
        return SavedEnum(qualified_name, value)

    return member


def _dcp_classes() -> dict[tuple[str, str], Any]:
    """The classes torch's distributed checkpoint pickles into ``.metadata`` (torch 2.4-2.13,
    ``torch/distributed/checkpoint/metadata.py``, ``filesystem.py``, ``planner.py``)."""
    from torch.distributed.checkpoint import filesystem, metadata, planner

    found: dict[tuple[str, str], Any] = {}
    for module, names in (
        (
            metadata,
            (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            ),
        ),
        (filesystem, ("_StorageInfo",)),
        (planner, ("SavePlan", "WriteItem", "TensorWriteData", "WriteItemType")),
    ):
        for name in names:
            if hasattr(module, name):
                found[(module.__name__, name)] = getattr(module, name)
    return found


def _plain_classes() -> dict[tuple[str, str], Any]:
    """Containers, torch's value types and tensor rebuilding: what ``args``, the optimizer's
    scalars and the DCP index are made of."""
    import argparse
    import collections
    import pathlib
    import signal

    return {
        ("argparse", "Namespace"): argparse.Namespace,  # Megatron-LM's args
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("signal", "Signals"): signal.Signals,  # args.exit_signal
        ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id, paths in args
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("torch", "Size"): torch.Size,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    }


_ALLOWED: dict[tuple[str, str], Any] = {}


def allowed_class(module: str, name: str) -> Any:
    """The object ``module.name`` stands for in an input's pickle, or None if refused."""
    if not _ALLOWED:
        _ALLOWED.update(_plain_classes())
        _ALLOWED.update(_dcp_classes())
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module == "torch":  # dtypes, layouts, memory formats: values, not code
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            return value
    if module in MEGATRON_ENUM_MODULES and name.isidentifier() and name[:1].isupper():
        return _saved_enum(f"{module}.{name}")
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``allowed_class`` names. ``where`` names the
    file (and item) in the error."""

    where = "a pickle"

    def find_class(self, module: str, name: str) -> Any:
        found = allowed_class(module, name)
        if found is None:
            raise RefusedClass(module, name)
        return found


class RefusedClass(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


def refusal(where: str | Path, exc: RefusedClass) -> WeightError:
    return WeightError(
        f"{where}: names class {exc.qualified_name}, which no checkpoint file holds; refused "
        "(a pickle that names other classes could run code)"
    )


def load(handle: IO[bytes], where: str | Path) -> Any:
    """Unpickle a plain pickle (the DCP ``.metadata``) from ``handle``."""
    try:
        return RestrictedUnpickler(handle).load()
    except RefusedClass as exc:
        raise refusal(where, exc) from None
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise WeightError(f"{where}: not a readable pickle: {_first_line(exc)}") from None


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: torch wraps ``Unpickler`` to resolve its
    own storage classes and calls ``find_class`` of ours for everything else."""

    Unpickler = RestrictedUnpickler
    load = staticmethod(pickle.load)
    UnpicklingError = pickle.UnpicklingError


def torch_load(data: bytes | IO[bytes], where: str | Path) -> Any:
    """Read a ``torch.save`` archive (``common.pt``, the ``common_state`` object) through the
    restricted unpickler: tensors are rebuilt, nothing else beyond ``allowed_class`` runs."""
    handle = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return torch.load(handle, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except RefusedClass as exc:
        raise refusal(where, exc) from None
    except Exception as exc:  # a corrupt archive can raise almost anything
        raise WeightError(f"{where}: cannot read it: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__
