"""The weight-map vocabulary shared by specs and generated bridges (no torch import here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridgegen.bridge.config import MegatronConfig


class WeightKind(str, Enum):
    """How HF tensors become one Megatron tensor (and which slice each TP rank owns)."""

    replicated = "replicated"  # same tensor; every TP rank holds all of it (norms, routers)
    column = "column"  # split on dim 0 over TP
    row = "row"  # split on dim 1 over TP
    vocab = "vocab"  # embeddings / output layer: rows padded to the padded vocab, split on dim 0
    qkv = "qkv"  # q, k, v interleaved by query group, split on dim 0 (whole groups per rank)
    gate_up = "gate_up"  # gate and up stacked; each half split on dim 0
    fused_qkv = "fused_qkv"  # one HF tensor holding [q; k; v] (Phi-3 qkv_proj)
    fused_gate_up = "fused_gate_up"  # one HF tensor holding [gate; up] (Phi-3 gate_up_proj)
    constant = "constant"  # no HF tensor: filled with the rule's value on import, checked on export


class HFLayout(str, Enum):
    """How an HF tensor is stored next to its Megatron tensor (declared by the spec, never guessed
    from shapes: a square tensor fits either way)."""

    same = "same"  # [out, in] like Megatron (torch.nn.Linear)
    transposed = "transposed"  # [in, out] (modules computing x @ W); stacked experts: [E, in, out]
    unsqueezed = "unsqueezed"  # a leading dim of 1 Megatron lacks ([1, E] for Megatron's [E])


class GateUp(str, Enum):
    """Where gate and up sit in a fused_gate_up HF tensor (along Megatron's dim 0, i.e. after any
    declared transposition)."""

    stacked = "stacked"  # [gate; up]
    interleaved = "interleaved"  # gate = [0::2], up = [1::2]


# How many HF tensors each kind combines.
HF_ARITY: dict[WeightKind, int] = {WeightKind.qkv: 3, WeightKind.gate_up: 2, WeightKind.constant: 0}

# Kinds whose HF tensors may be stored transposed (2-D matrices split whole along one dim).
TRANSPOSABLE_KINDS = (
    WeightKind.replicated,
    WeightKind.column,
    WeightKind.row,
    WeightKind.gate_up,
    WeightKind.fused_gate_up,
)


@dataclass(frozen=True)
class WeightRule:
    """One Megatron tensor (a name template with ``{layer}``) and the HF tensors it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: WeightKind
    te_megatron_name: str | None = None
    norm_offset: float = 0.0
    when: Callable[[MegatronConfig], bool] | None = None
    hf_stacked_experts: bool = False  # HF tensors hold all experts stacked on dim 0
    # HF tensors repeating the (single) HF tensor; {mtp_layer}: each multi-token prediction
    # layer's HF number (num_layers + m).
    hf_copies: tuple[str, ...] = ()
    hf_layout: HFLayout = HFLayout.same
    gate_up: GateUp = GateUp.stacked
    value: float = 0.0  # kind constant: what the Megatron tensor holds
    # The Megatron name template of the rule whose HF tensor this one repeats (one HF tensor
    # feeding two Megatron tensors): imported from it, never exported; an export checks the copy
    # equals the tensor written.
    shares_hf_with: str | None = None

    def applies(self, config: MegatronConfig) -> bool:
        return self.when is None or self.when(config)
