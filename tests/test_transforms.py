"""Unit tests of the per-kind weight transforms (no megatron-core import).

Every expected value comes from an independent reference written here from Megatron's layouts:

* fused QKV: query group ``g`` is the block ``[Q heads g*n .. g*n+n-1; K head g; V head g]``
  with ``n = heads // groups``; a TP rank holds whole groups, in order;
* fc1 (gate/up): TP shard ``r`` is ``cat(gate.chunk(tp)[r], up.chunk(tp)[r])``;
* row-parallel tensors split on dim 1, column-parallel on dim 0;
* vocab tensors are padded with zero rows to the padded vocab, then split on dim 0.
"""

from __future__ import annotations

import pytest
import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import WeightKind
from bridgegen.plan.transforms import Layout, gather_tp_shards, load_shard, split_full

HEADS, GROUPS, DIM, HIDDEN, VOCAB = 8, 2, 3, 5, 10
PADDED = 16  # divisible by 1, 2 and 4


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def _layout(rank: int = 0, tp: int = 1, heads: int = HEADS, groups: int = GROUPS) -> Layout:
    return Layout(heads, groups, DIM, VOCAB, tp_rank=rank, tp_size=tp)


class Reads:
    """A ``read`` callback that counts the elements it is handed."""

    def __init__(self) -> None:
        self.elements = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.elements += tensor.numel()
        return tensor


def _load(
    kind: WeightKind,
    dest_shape: tuple[int, ...],
    sources: list[torch.Tensor],
    layout: Layout,
    norm_offset: float = 0.0,
    reads: Reads | None = None,
) -> torch.Tensor:
    dest = torch.full(dest_shape, float("nan"), dtype=sources[0].dtype)
    names = tuple(f"hf.{i}.weight" for i in range(len(sources)))
    load_shard(kind, dest, sources, names, layout, reads or Reads(), norm_offset)
    return dest


# ---------------------------------------------------------------- reference implementations


def ref_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, dim: int):
    """Megatron's fused QKV for the whole model, built head by head."""
    n = heads // groups
    blocks = []
    for g in range(groups):
        for i in range(n):
            head = g * n + i
            blocks.append(q[head * dim : (head + 1) * dim])
        blocks.append(k[g * dim : (g + 1) * dim])
        blocks.append(v[g * dim : (g + 1) * dim])
    return torch.cat(blocks)


def ref_qkv_rank(q, k, v, heads: int, groups: int, dim: int, rank: int, tp: int) -> torch.Tensor:
    """The fused QKV of the groups rank ``rank`` owns, from those groups' heads only."""
    n = heads // groups
    per_rank = groups // tp
    local = range(rank * per_rank, (rank + 1) * per_rank)
    q_local = torch.cat([q[(g * n) * dim : (g * n + n) * dim] for g in local])
    k_local = torch.cat([k[g * dim : (g + 1) * dim] for g in local])
    v_local = torch.cat([v[g * dim : (g + 1) * dim] for g in local])
    return ref_qkv(q_local, k_local, v_local, per_rank * n, per_rank, dim)


def ref_gate_up_rank(gate: torch.Tensor, up: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])


def ref_vocab(embed: torch.Tensor, padded: int) -> torch.Tensor:
    pad = torch.zeros(padded - embed.shape[0], *embed.shape[1:], dtype=embed.dtype)
    return torch.cat([embed, pad])


# ---------------------------------------------------------------- QKV


@pytest.mark.parametrize(
    ("heads", "groups"),
    [(8, 2), (8, 8), (8, 1), (4, 4), (6, 2)],
    ids=["gqa", "mha", "mqa", "mha4", "gqa3"],
)
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_qkv_tp1_matches_reference(heads: int, groups: int, bias: bool) -> None:
    rest = () if bias else (HIDDEN,)
    q = _rand(heads * DIM, *rest, seed=1)
    k = _rand(groups * DIM, *rest, seed=2)
    v = _rand(groups * DIM, *rest, seed=3)
    expected = ref_qkv(q, k, v, heads, groups, DIM)
    layout = _layout(heads=heads, groups=groups)
    got = _load(WeightKind.qkv, tuple(expected.shape), [q, k, v], layout)
    assert torch.equal(got, expected)
    fused = _load(WeightKind.fused_qkv, tuple(expected.shape), [torch.cat([q, k, v])], layout)
    assert torch.equal(fused, expected)
    # and back
    assert all(
        torch.equal(a, b) for a, b in zip(split_full(WeightKind.qkv, got, layout), [q, k, v], strict=True)
    )
    (back,) = split_full(WeightKind.fused_qkv, got, layout)
    assert torch.equal(back, torch.cat([q, k, v]))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
@pytest.mark.parametrize("fused", [False, True], ids=["qkv", "fused_qkv"])
def test_qkv_tp_shards(tp: int, bias: bool, fused: bool) -> None:
    heads, groups = 8, 4
    rest = () if bias else (HIDDEN,)
    q = _rand(heads * DIM, *rest, seed=4)
    k = _rand(groups * DIM, *rest, seed=5)
    v = _rand(groups * DIM, *rest, seed=6)
    full = ref_qkv(q, k, v, heads, groups, DIM)
    kind = WeightKind.fused_qkv if fused else WeightKind.qkv
    sources = [torch.cat([q, k, v])] if fused else [q, k, v]
    shards = []
    for rank in range(tp):
        reads = Reads()
        shard_shape = (full.shape[0] // tp, *rest)
        got = _load(kind, shard_shape, sources, _layout(rank, tp, heads, groups), reads=reads)
        assert torch.equal(got, full.chunk(tp)[rank])
        assert torch.equal(got, ref_qkv_rank(q, k, v, heads, groups, DIM, rank, tp))
        assert reads.elements == got.numel()  # a rank reads only its own heads
        shards.append(got)
    assert torch.equal(gather_tp_shards(kind, shards), full)


def test_qkv_groups_must_split_over_tp() -> None:
    q, k, v = _rand(8 * DIM, HIDDEN, seed=1), _rand(2 * DIM, HIDDEN, seed=2), _rand(2 * DIM, HIDDEN, seed=3)
    names = ("layers.0.q.weight", "layers.0.k.weight", "layers.0.v.weight")
    dest = torch.empty(3 * DIM, HIDDEN)
    with pytest.raises(WeightError, match=r"layers\.0\.q\.weight \(query groups\).*tensor parallel size 4"):
        load_shard(WeightKind.qkv, dest, [q, k, v], names, _layout(0, 4), Reads())


@pytest.mark.parametrize("which", [0, 1, 2])
def test_qkv_wrong_source_shape_names_the_tensor(which: int) -> None:
    sources = [_rand(8 * DIM, HIDDEN, seed=1), _rand(2 * DIM, HIDDEN, seed=2), _rand(2 * DIM, HIDDEN, seed=3)]
    sources[which] = sources[which][:-1]
    names = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    dest = torch.empty(12 * DIM, HIDDEN)
    with pytest.raises(WeightError, match=rf"^{names[which]}: shape \[\d+, {HIDDEN}\] does not match"):
        load_shard(WeightKind.qkv, dest, sources, names, _layout(), Reads())


def test_fused_qkv_wrong_rows_names_the_tensor() -> None:
    dest = torch.empty(12 * DIM, HIDDEN)
    with pytest.raises(
        WeightError, match=r"^qkv_proj\.weight: shape \[35\] does not match the expected \[36\]"
    ):
        load_shard(
            WeightKind.fused_qkv, dest, [_rand(35, HIDDEN, seed=0)], ("qkv_proj.weight",), _layout(), Reads()
        )


# ---------------------------------------------------------------- gate / up


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("fused", [False, True], ids=["gate_up", "fused_gate_up"])
def test_gate_up_tp_shards(tp: int, fused: bool) -> None:
    ffn = 12
    gate, up = _rand(ffn, HIDDEN, seed=7), _rand(ffn, HIDDEN, seed=8)
    kind = WeightKind.fused_gate_up if fused else WeightKind.gate_up
    sources = [torch.cat([gate, up])] if fused else [gate, up]
    full = torch.cat([gate, up])
    shards = []
    for rank in range(tp):
        reads = Reads()
        got = _load(kind, (2 * ffn // tp, HIDDEN), sources, _layout(rank, tp), reads=reads)
        assert torch.equal(got, ref_gate_up_rank(gate, up, rank, tp))
        assert reads.elements == got.numel()
        shards.append(got)
    gathered = gather_tp_shards(kind, shards)
    assert torch.equal(gathered, full)
    if fused:
        (back,) = split_full(kind, gathered, _layout())
        assert torch.equal(back, torch.cat([gate, up]))
    else:
        g, u = split_full(kind, gathered, _layout())
        assert torch.equal(g, gate) and torch.equal(u, up)


def test_gate_up_rank_shard_is_not_a_plain_chunk() -> None:
    """The interleaving matters: a plain dim-0 chunk of [gate; up] would be wrong at TP=2."""
    gate, up = _rand(4, HIDDEN, seed=1), _rand(4, HIDDEN, seed=2)
    got = _load(WeightKind.gate_up, (4, HIDDEN), [gate, up], _layout(0, 2))
    assert not torch.equal(got, torch.cat([gate, up]).chunk(2)[0])
    assert torch.equal(got, torch.cat([gate[:2], up[:2]]))


def test_gate_up_mismatched_shapes() -> None:
    with pytest.raises(
        WeightError, match=r"^up\.weight: shape \[5, 5\] does not match the expected \[6, 5\]"
    ):
        load_shard(
            WeightKind.gate_up,
            torch.empty(12, HIDDEN),
            [_rand(6, HIDDEN, seed=1), _rand(5, HIDDEN, seed=2)],
            ("gate.weight", "up.weight"),
            _layout(),
            Reads(),
        )


# ---------------------------------------------------------------- row / column / replicated


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_splits_dim1(tp: int) -> None:
    src = _rand(HIDDEN, 8, seed=9)
    shards = []
    for rank in range(tp):
        reads = Reads()
        got = _load(WeightKind.row, (HIDDEN, 8 // tp), [src], _layout(rank, tp), reads=reads)
        assert torch.equal(got, src[:, rank * (8 // tp) : (rank + 1) * (8 // tp)])
        assert torch.equal(got, src.chunk(tp, dim=1)[rank])
        assert reads.elements == got.numel()
        shards.append(got)
    full = gather_tp_shards(WeightKind.row, shards)
    assert torch.equal(full, src)
    (back,) = split_full(WeightKind.row, full, _layout())
    assert torch.equal(back, src)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_column_splits_dim0(tp: int, bias: bool) -> None:
    src = _rand(8, *(() if bias else (HIDDEN,)), seed=10)
    shards = []
    for rank in range(tp):
        reads = Reads()
        got = _load(WeightKind.column, (8 // tp, *src.shape[1:]), [src], _layout(rank, tp), reads=reads)
        assert torch.equal(got, src.chunk(tp)[rank])
        assert reads.elements == got.numel()
        shards.append(got)
    full = gather_tp_shards(WeightKind.column, shards)
    assert torch.equal(full, src)
    (back,) = split_full(WeightKind.column, full, _layout())
    assert torch.equal(back, src)


def test_row_must_be_2d() -> None:
    with pytest.raises(
        WeightError, match=r"^o_proj\.weight: a row-parallel tensor must be 2-D, got shape \[8\]"
    ):
        load_shard(WeightKind.row, torch.empty(8), [_rand(8, seed=0)], ("o_proj.weight",), _layout(), Reads())


@pytest.mark.parametrize("kind", [WeightKind.row, WeightKind.column])
def test_uneven_split_names_the_tensor(kind: WeightKind) -> None:
    src = _rand(6, 6, seed=0)
    with pytest.raises(
        WeightError, match=r"^proj\.weight: dimension 6 does not split evenly over tensor parallel size 4"
    ):
        load_shard(kind, torch.empty(6, 6), [src], ("proj.weight",), _layout(0, 4), Reads())


@pytest.mark.parametrize(("tp", "rank"), [(1, 0), (2, 0), (2, 1)])
def test_replicated_is_copied_whole_on_every_rank(tp: int, rank: int) -> None:
    src = _rand(HIDDEN, seed=11)
    got = _load(WeightKind.replicated, (HIDDEN,), [src], _layout(rank, tp))
    assert torch.equal(got, src)
    (back,) = split_full(WeightKind.replicated, got, _layout())
    assert torch.equal(back, src)


def test_replicated_wrong_shape() -> None:
    with pytest.raises(WeightError, match=r"^norm\.weight: shape \[4\] does not match the expected \[5\]"):
        load_shard(
            WeightKind.replicated,
            torch.empty(HIDDEN),
            [_rand(4, seed=0)],
            ("norm.weight",),
            _layout(),
            Reads(),
        )


@pytest.mark.parametrize("offset", [1.0, -0.5])
def test_norm_offset_is_added_on_load_and_removed_on_export(offset: float) -> None:
    # Multiples of 1/64 in a small range: +offset and -offset are exact in float32.
    src = torch.arange(-8, 8, dtype=torch.float32) / 64
    got = _load(WeightKind.replicated, (16,), [src], _layout(), norm_offset=offset)
    assert torch.equal(got, src + offset)
    (back,) = split_full(WeightKind.replicated, got, _layout(), norm_offset=offset)
    assert back.dtype == torch.float32
    assert torch.equal(back, src)
    # Arbitrary values lose bits in w + offset even in float32: refused, naming how many.
    rnd = _rand(16, seed=12)
    with pytest.raises(WeightError, match=r"norm_offset .* loses bits of \d+ of 16 entries even in float32"):
        _load(WeightKind.replicated, (16,), [rnd], _layout(), norm_offset=offset)


def test_norm_offset_into_a_bf16_parameter_is_refused() -> None:
    """1 + w stored in bf16 keeps only ~8 bits of w, so an export could not give w back."""
    src = (_rand(256, seed=16) * 0.05).to(torch.bfloat16)
    assert not torch.equal(((src.float() + 1.0).to(torch.bfloat16).float() - 1.0).to(torch.bfloat16), src)
    with pytest.raises(
        WeightError, match=r"^norm.weight: norm_offset into a torch.bfloat16 parameter loses bits"
    ):
        load_shard(
            WeightKind.replicated,
            torch.empty(256, dtype=torch.bfloat16),
            [src],
            ("norm.weight",),
            _layout(),
            Reads(),
            1.0,
        )


def test_norm_offset_fp32_destination_keeps_bf16_values() -> None:
    """megatron-core's local RMSNorm keeps its weight in float32: there the offset is exact."""
    src = (_rand(256, seed=16) * 0.05).to(torch.bfloat16)
    dest = torch.empty(256, dtype=torch.float32)
    load_shard(WeightKind.replicated, dest, [src], ("norm.weight",), _layout(), Reads(), 1.0)
    (back,) = split_full(WeightKind.replicated, dest, _layout(), norm_offset=1.0)
    assert torch.equal(back.to(torch.bfloat16), src)


# ---------------------------------------------------------------- vocab


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_pads_with_zero_rows_and_splits_dim0(tp: int) -> None:
    embed = _rand(VOCAB, HIDDEN, seed=13)
    full = ref_vocab(embed, PADDED)
    shards = []
    total_reads = 0
    for rank in range(tp):
        reads = Reads()
        got = _load(
            WeightKind.vocab,
            (PADDED // tp, HIDDEN),
            [embed],
            Layout(HEADS, GROUPS, DIM, VOCAB, rank, tp),
            reads=reads,
        )
        assert torch.equal(got, full.chunk(tp)[rank])
        total_reads += reads.elements
        shards.append(got)
    assert total_reads == embed.numel()  # each real row read exactly once over the ranks
    gathered = gather_tp_shards(WeightKind.vocab, shards)
    assert torch.equal(gathered, full)
    assert torch.equal(gathered[VOCAB:], torch.zeros(PADDED - VOCAB, HIDDEN))
    (back,) = split_full(WeightKind.vocab, gathered, Layout(HEADS, GROUPS, DIM, VOCAB))
    assert torch.equal(back, embed)


def test_vocab_rank_holding_only_padding_is_zeroed() -> None:
    embed = _rand(3, HIDDEN, seed=14)
    layout = Layout(HEADS, GROUPS, DIM, 3, tp_rank=1, tp_size=2)
    got = _load(WeightKind.vocab, (4, HIDDEN), [embed], layout)
    assert torch.equal(got, torch.zeros(4, HIDDEN))


def test_vocab_not_padded_is_exact() -> None:
    embed = _rand(PADDED, HIDDEN, seed=15)
    got = _load(WeightKind.vocab, (PADDED // 2, HIDDEN), [embed], Layout(HEADS, GROUPS, DIM, PADDED, 1, 2))
    assert torch.equal(got, embed[PADDED // 2 :])


def test_vocab_rows_must_match_config() -> None:
    with pytest.raises(
        WeightError, match=r"^embed_tokens\.weight: 9 rows, but the config's vocab_size is 10"
    ):
        load_shard(
            WeightKind.vocab,
            torch.empty(PADDED, HIDDEN),
            [_rand(9, HIDDEN, seed=0)],
            ("embed_tokens.weight",),
            _layout(),
            Reads(),
        )


def test_vocab_padded_smaller_than_vocab() -> None:
    with pytest.raises(
        WeightError, match=r"^embed_tokens\.weight: padded vocab 8 is smaller than vocab_size 10"
    ):
        load_shard(
            WeightKind.vocab,
            torch.empty(8, HIDDEN),
            [_rand(VOCAB, HIDDEN, seed=0)],
            ("embed_tokens.weight",),
            _layout(),
            Reads(),
        )


def test_vocab_hidden_mismatch() -> None:
    with pytest.raises(
        WeightError, match=r"^embed_tokens\.weight: shape \[4\] does not match the expected \[5\]"
    ):
        load_shard(
            WeightKind.vocab,
            torch.empty(PADDED, HIDDEN),
            [_rand(VOCAB, 4, seed=0)],
            ("embed_tokens.weight",),
            _layout(),
            Reads(),
        )


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_and_split_keep_bits_in_every_dtype(dtype: torch.dtype) -> None:
    q, k, v = (_rand(n * DIM, HIDDEN, seed=s, dtype=dtype) for n, s in ((HEADS, 1), (GROUPS, 2), (GROUPS, 3)))
    got = _load(WeightKind.qkv, ((HEADS + 2 * GROUPS) * DIM, HIDDEN), [q, k, v], _layout())
    assert got.dtype == dtype
    assert torch.equal(got, ref_qkv(q, k, v, HEADS, GROUPS, DIM))
    for a, b in zip(split_full(WeightKind.qkv, got, _layout()), [q, k, v], strict=True):
        assert a.dtype == dtype and torch.equal(a, b)


# ---------------------------------------------------------------- export: each rank writes its own slices

WRITE_CASES: dict[WeightKind, list[tuple[int, int]]] = {  # kind: HF source shapes
    WeightKind.qkv: [(HEADS * DIM, HIDDEN), (GROUPS * DIM, HIDDEN), (GROUPS * DIM, HIDDEN)],
    WeightKind.fused_qkv: [((HEADS + 2 * GROUPS) * DIM, HIDDEN)],
    WeightKind.gate_up: [(8, HIDDEN), (8, HIDDEN)],
    WeightKind.fused_gate_up: [(16, HIDDEN)],
    WeightKind.column: [(8, HIDDEN)],
    WeightKind.row: [(HIDDEN, 8)],
    WeightKind.vocab: [(VOCAB, HIDDEN)],
}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", sorted(WRITE_CASES, key=lambda k: k.value))
def test_shard_writes_from_every_rank_rebuild_the_hf_tensors(kind: WeightKind, tp: int) -> None:
    from bridgegen.plan.transforms import store_shard

    shapes = WRITE_CASES[kind]
    sources = [_rand(*shape, seed=i) for i, shape in enumerate(shapes)]
    names = tuple(f"hf.{i}.weight" for i in range(len(sources)))
    rebuilt = [torch.full_like(s, float("nan")) for s in sources]
    for rank in range(tp):
        layout = _layout(rank, tp)
        if kind is WeightKind.vocab:
            dest_shape: tuple[int, ...] = (PADDED // tp, HIDDEN)
        elif kind is WeightKind.row:
            dest_shape = (HIDDEN, 8 // tp)
        elif kind in (WeightKind.qkv, WeightKind.fused_qkv):
            dest_shape = ((HEADS + 2 * GROUPS) * DIM // tp, HIDDEN)
        else:
            dest_shape = (sum(s[0] for s in shapes) // tp, HIDDEN)
        shard = _load(kind, dest_shape, sources, layout)
        store_shard(kind, shard, rebuilt, names, layout)
    for source, result in zip(sources, rebuilt, strict=True):
        assert torch.equal(source, result)  # every element written once, by its owner


def test_contiguous_runs_of_a_column_slice() -> None:
    from bridgegen.formats.hf_writer import contiguous_runs

    base = torch.empty(4, 6, device="meta")
    assert list(contiguous_runs(base[:, 2:5])) == [(2, 3), (8, 3), (14, 3), (20, 3)]
    assert list(contiguous_runs(base[1:3])) == [(6, 12)]
    grouped = torch.empty(2, 3, 4, device="meta").view(2, 3, 4)[1:]
    assert list(contiguous_runs(grouped)) == [(12, 12)]


# ---------------------------------------------------------------- verbatim rows: written without a copy

VERBATIM_CASES = {**WRITE_CASES, WeightKind.replicated: [(HIDDEN,)]}


@pytest.mark.parametrize("padded", [False, True], ids=["exact_vocab", "padded_vocab"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", sorted(VERBATIM_CASES, key=lambda k: k.value))
def test_verbatim_rows_are_what_load_shard_fills(kind: WeightKind, tp: int, padded: bool) -> None:
    """Where ``verbatim_rows`` offers the sources' rows as they are, they are exactly the shard
    ``load_shard`` makes (so a writer may take them instead); where the transform computes or
    rearranges it offers nothing. Which kinds are offered is pinned too: a change there changes
    what the streaming import copies."""
    from bridgegen.plan.transforms import verbatim_rows

    shapes = VERBATIM_CASES[kind]
    sources = [_rand(*shape, seed=i) for i, shape in enumerate(shapes)]
    vocab_rows = PADDED if padded else VOCAB
    rank = tp - 1
    layout = Layout(HEADS, GROUPS, DIM, VOCAB, tp_rank=rank, tp_size=tp)
    if kind is WeightKind.vocab:
        dest_shape: tuple[int, ...] = (vocab_rows // tp, HIDDEN)
    elif kind is WeightKind.row:
        dest_shape = (HIDDEN, 8 // tp)
    elif kind is WeightKind.replicated:
        dest_shape = (HIDDEN,)
    elif kind in (WeightKind.qkv, WeightKind.fused_qkv):
        dest_shape = ((HEADS + 2 * GROUPS) * DIM // tp, HIDDEN)
    else:
        dest_shape = (sum(s[0] for s in shapes) // tp, HIDDEN)
    rows = verbatim_rows(kind, dest_shape, sources, layout)
    whole_rows = {WeightKind.replicated, WeightKind.column, WeightKind.gate_up, WeightKind.fused_gate_up}
    expected_offered = (
        kind in whole_rows
        or (kind is WeightKind.row and tp == 1)
        or (kind is WeightKind.vocab and not padded)
    )
    assert (rows is not None) == expected_offered
    if rows is not None:
        memory = {source.untyped_storage().data_ptr() for source in sources}
        assert all(block.untyped_storage().data_ptr() in memory for block in rows)  # views, not copies
        assert torch.equal(torch.cat(rows), _load(kind, dest_shape, sources, layout))


def test_verbatim_rows_refuse_a_norm_offset_and_interleaved_gate_up() -> None:
    from bridgegen.bridge.weight_rules import GateUp
    from bridgegen.plan.transforms import verbatim_rows

    norm = [_rand(HIDDEN, seed=0)]
    assert verbatim_rows(WeightKind.replicated, (HIDDEN,), norm, _layout(), norm_offset=1.0) is None
    fused = [_rand(16, HIDDEN, seed=0)]
    assert verbatim_rows(WeightKind.fused_gate_up, (16, HIDDEN), fused, _layout(), gate_up=GateUp.interleaved) is None
