"""Which slice of each HF tensor an inference engine's tensor-parallel rank keeps.

vLLM loads whole HF tensors and each of its TP ranks narrows them to what its layers hold. A
weight sync that knows the receiving rank can send only that slice. The slice of one HF tensor
on rank ``k`` of ``K`` follows from the spec's weight-rule kind of the Megatron tensor it
belongs to (Megatron and vLLM shard the same layers the same way), and from which of the
rule's HF tensors it is:

* ``column``: dim 0 (rows) in K equal parts; ``row``: dim 1 (columns) in K equal parts;
* ``gate_up``: gate and up each by rows, like ``column``;
* ``qkv``: q by heads (rows, K equal parts); k and v by key/value heads as vLLM's
  ``QKVParallelLinear`` does: with K < kv_heads each rank takes kv_heads / K heads; with
  K >= kv_heads the heads are replicated, rank k taking head ``k // (K // kv_heads)``;
* ``vocab``: vocabulary rows as vLLM's ``VocabParallelEmbedding`` / ``ParallelLMHead`` hold
  them: the vocabulary is padded to a multiple of 64 (``VOCAB_PADDING``), the padded rows are
  split in K equal parts, and rank k gets the real rows of its part,
  ``[k * P / K, min((k + 1) * P / K, vocab_size))`` (fewer rows on the last ranks, possibly
  none; the padding itself is not sent: vLLM's parameter holds it);
* ``replicated`` (norms, routers, biases of row-parallel layers): the whole tensor (None);
* ``fused_gate_up`` stored interleaved (gate and up rows alternating, GPT-OSS): the one run
  of rows holding rank k's gate and up rows;
* ``fused_gate_up`` stacked ([gate; up] in one HF tensor) and ``fused_qkv``: refused, since
  rank k's part is not one contiguous slice.

Dims are counted in the HF tensor as stored: a ``hf_layout: transposed`` tensor's dims are
swapped, and a tensor holding all experts stacked (``hf_stacked_experts``) has the expert dim
first. Experts are sliced like dense tensors (vLLM's fused MoE without expert parallelism:
every rank holds every expert's TP slice).
"""

from __future__ import annotations

from typing import NamedTuple

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import GateUp, HFLayout, WeightKind
from bridgegen.plan.transforms import Layout
from bridgegen.plan.weight_map import MatchedTensor

# vLLM's DEFAULT_VOCAB_PADDING_SIZE: its vocabulary-parallel layers pad the vocabulary to a
# multiple of this before splitting it over TP ranks.
VOCAB_PADDING = 64


class HFSlice(NamedTuple):
    """Rows ``start:stop`` of dim ``dim`` of one HF tensor (as stored)."""

    dim: int
    start: int
    stop: int


def _even(size: int, k: int, count: int, what: str) -> tuple[int, int]:
    if size % count:
        raise WeightError(f"{what}: dimension {size} does not split evenly over inference TP size {count}")
    step = size // count
    return k * step, (k + 1) * step


def _kv_heads(k: int, count: int, heads: Layout, what: str) -> tuple[int, int]:
    """The key/value heads rank k of K holds, by vLLM's QKVParallelLinear rule."""
    kv = heads.num_query_groups
    if count >= kv:
        if count % kv:
            raise WeightError(
                f"{what}: {kv} key/value heads cannot be replicated evenly over inference TP size {count}"
            )
        head = k // (count // kv)
        return head, head + 1
    return _even(kv, k, count, f"{what} (key/value heads)")


def vocab_rows(vocab_size: int, k: int, count: int, padding: int = VOCAB_PADDING) -> tuple[int, int]:
    """The real vocabulary rows rank k of K holds (vLLM's vocabulary-parallel split)."""
    padded = -(-vocab_size // padding) * padding
    if padded % count:
        raise WeightError(
            f"vocabulary padded to {padded} (a multiple of {padding}) does not split evenly over inference TP size {count}"
        )
    per = padded // count
    start = min(k * per, vocab_size)
    return start, min(start + per, vocab_size)


def hf_slice(
    kind: WeightKind,
    hf_name: str,
    full_shape: tuple[int, ...],
    k: int,
    count: int,
    heads: Layout,
    *,
    part: int = 0,
    transposed: bool = False,
    stacked_experts: bool = False,
    gate_up: GateUp = GateUp.stacked,
) -> HFSlice | None:
    """The slice of HF tensor ``hf_name`` (shape ``full_shape`` as stored) that inference TP
    rank ``k`` of ``count`` keeps, or None for the whole tensor. ``part`` is the tensor's
    place among its rule's HF tensors (qkv: 0 q, 1 k, 2 v; gate_up: 0 gate, 1 up); ``heads``
    gives the attention heads, key/value heads, head dim and vocabulary size."""
    if not 0 <= k < count:
        raise WeightError(f"inference TP rank {k} is not a rank of inference TP size {count}")
    if count == 1 or kind is WeightKind.replicated:
        return None
    # The dim in Megatron's orientation (one expert's tensor), and the size along it.
    if kind is WeightKind.row:
        dim = 1
    elif kind in (WeightKind.fused_qkv, WeightKind.fused_gate_up) and not (
        kind is WeightKind.fused_gate_up and gate_up is GateUp.interleaved
    ):
        raise WeightError(
            f"{hf_name}: a {kind.value} HF tensor ({gate_up.value if kind is WeightKind.fused_gate_up else 'q, k, v'} "
            "in one tensor) is not one contiguous slice per inference TP rank"
        )
    else:
        dim = 0
    own = len(full_shape) - (1 if stacked_experts else 0)
    if transposed:
        if own != 2:
            raise WeightError(
                f"{hf_name}: a transposed HF tensor must be 2-D (per expert), got {list(full_shape)}"
            )
        dim = 1 - dim
    if dim >= own:
        raise WeightError(
            f"{hf_name}: a {kind.value} HF tensor needs dim {dim}, got shape {list(full_shape)}"
        )
    stored_dim = dim + (1 if stacked_experts else 0)
    size = full_shape[stored_dim]
    what = f"{hf_name} (inference TP)"
    if kind is WeightKind.vocab:
        try:
            start, stop = vocab_rows(heads.vocab_size, k, count)
        except WeightError as exc:
            raise WeightError(f"{what}: {exc}") from None
        if size != heads.vocab_size:
            raise WeightError(f"{hf_name}: {size} rows, but the config's vocab_size is {heads.vocab_size}")
    elif kind is WeightKind.qkv and part in (1, 2):
        first, last = _kv_heads(k, count, heads, what)
        if size % heads.num_query_groups:
            raise WeightError(f"{hf_name}: {size} rows are not {heads.num_query_groups} key/value heads")
        per_head = size // heads.num_query_groups
        start, stop = first * per_head, last * per_head
    elif kind is WeightKind.qkv:
        first, last = _even(heads.num_attention_heads, k, count, f"{what} (attention heads)")
        if size % heads.num_attention_heads:
            raise WeightError(f"{hf_name}: {size} rows are not {heads.num_attention_heads} attention heads")
        per_head = size // heads.num_attention_heads
        start, stop = first * per_head, last * per_head
    elif kind is WeightKind.fused_gate_up:  # interleaved: gate and up rows of rank k in one run
        if size % 2:
            raise WeightError(f"{hf_name}: fused gate/up needs an even dim, got shape {list(full_shape)}")
        first, last = _even(size // 2, k, count, what)
        start, stop = 2 * first, 2 * last
    else:  # column, row, gate_up
        start, stop = _even(size, k, count, what)
    return HFSlice(stored_dim, start, stop)


def matched_slice(
    matched: MatchedTensor, hf_name: str, full_shape: tuple[int, ...], k: int, count: int, heads: Layout
) -> HFSlice | None:
    """``hf_slice`` for one of the HF tensors (or copies) of a matched Megatron tensor."""
    names = matched.hf_names()
    part = names.index(hf_name) if hf_name in names else 0  # a copy repeats the rule's one HF tensor
    rule = matched.rule
    return hf_slice(
        rule.kind,
        hf_name,
        full_shape,
        k,
        count,
        heads,
        part=part,
        transposed=rule.hf_layout is HFLayout.transposed,
        stacked_experts=rule.hf_stacked_experts,
        gate_up=rule.gate_up,
    )
