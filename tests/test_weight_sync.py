"""Weight sync from a live model (bridgegen.engines.weight_sync) at TP / PP / VPP / EP /
expert-TP layouts, on 4 gloo processes (CPU).

The ranks play an RL framework's job: they set up the parallel state and build and load the
model (``build_chunks`` / ``load_hf``), then sync its weights and compare every yielded tensor
with the HF tensor the model was loaded from. One spawn runs every layout (the ranks share two
cores), and the tests read its results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bridgegen.bridge.errors import WeightError
from bridgegen.engines.launch import run_on_ranks
from bridgegen.engines.weight_sync import unwrap
from bridgegen.plan.sync import ALIGN, SyncTensor, SyncUnit, buckets, packed_offsets, renumber_expert

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

WORLD = 4
VOCAB = 250
EXPERTS = 4
MOE_LAYERS = 3  # layers 1-3 of the tiny Qwen3-MoE

# name -> (model, layout)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-tp2-pp2": ("llama", {"tp": 2, "pp": 2}),
    "llama-pp2-vpp2": ("llama", {"pp": 2, "vpp": 2}),
    # Wrapped as Megatron-LM wraps a --bf16 model: DDP(Float16Module(model)).
    "llama-bf16-tied-wrapped-tp2-pp2": ("llama_bf16_tied", {"tp": 2, "pp": 2}),
    "moe-ep2-pp2": ("moe", {"ep": 2, "pp": 2}),
    "moe-tp2-ep2-etp2": ("moe", {"tp": 2, "ep": 2, "etp": 2}),
    # Experts stacked [E, ...] in HF, gate/up interleaved, tensors stored transposed
    # (tests/test_layouts.py's spec), at uneven pipeline stages (1 + 2 of 3 layers).
    "stacked-ep2-pp2-uneven": (
        "stacked",
        {"ep": 2, "pp": 2, "first_stage_layers": 1, "last_stage_layers": 2},
    ),
}


# ------------------------------------------------------------------ models


def make_llama(folder: Path, dtype: torch.dtype, tied: bool) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder)
    return str(folder)


def qwen3_moe_config() -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        num_hidden_layers=1 + MOE_LAYERS,
        mlp_only_layers=[0],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )


def make_moe(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(qwen3_moe_config()).save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------ what each rank runs


def global_state() -> dict[str, Any]:
    """What a sync must leave as it found it."""
    from torch.distributed import distributed_c10d

    return {
        "groups": len(distributed_c10d._world.pg_map),
        "current_device": torch.cuda.current_device,
        "tensor_cuda": torch.Tensor.cuda,
        "rng": torch.get_rng_state(),
        "grad": torch.is_grad_enabled(),
    }


def same_state(before: dict[str, Any], after: dict[str, Any]) -> bool:
    return (
        before["groups"] == after["groups"]
        and before["current_device"] is after["current_device"]
        and before["tensor_cuda"] is after["tensor_cuda"]
        and torch.equal(before["rng"], after["rng"])
        and before["grad"] == after["grad"]
    )


class ModuleWrapper(torch.nn.Module):
    """A DDP-style wrapper: its parameters are named ``module.*``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def compared(
    yielded: list[tuple[str, torch.Tensor]], source: dict[str, torch.Tensor], manifest: list[Any]
) -> dict[str, Any]:
    """How a sync's tensors compare with the HF source and the manifest."""
    names = [name for name, _ in yielded]
    return {
        "names": names,
        "as_manifest": [(n, t.shape, t.dtype) for n, t in yielded] == manifest,
        "unequal": [
            n
            for n, t in yielded
            if n not in source or t.dtype != source[n].dtype or not torch.equal(t, source[n])
        ],
        "missing": sorted(set(source) - set(names)),
        "repeated": len(names) - len(set(names)),
        "devices": sorted({str(t.device) for _, t in yielded}),
    }


def sync_case(case: str, folder: str, bridge_file: str | None) -> dict[str, Any]:
    """Build and load one case's model at its layout, then sync it every way the tests ask."""
    import dist_cases
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from safetensors.torch import load_file

    from bridgegen.engines.distributed import ParallelLayout, build_chunks, load_hf
    from bridgegen.engines.weight_sync import WeightExport

    _, layout = CASES[case]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # the job's next layout
    bridge = dist_cases.model_bridge(folder, bridge_file)
    source: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        source.update(load_file(file))
    dtype = next(iter(source.values())).dtype
    chunks = build_chunks(bridge, ParallelLayout(**layout), dtype)
    load_hf(bridge, chunks, folder)
    models: list[torch.nn.Module] = [chunk.model for chunk in chunks]
    out: dict[str, Any] = {"rank": dist.get_rank()}
    if "wrapped" in case:
        # Megatron-LM's --bf16 wrapping: names start with module.module.
        models = [
            DistributedDataParallel(
                model.config, DistributedDataParallelConfig(), Float16Module(model.config, model)
            )
            for model in models
        ]
        assert next(iter(dict(models[0].named_parameters()))).startswith("module.module.")

    before = global_state()
    export = WeightExport(bridge, models if len(models) > 1 else models[0])
    manifest = export.manifest()
    counted = count_collectives()
    yielded = list(export())
    out["collectives"] = counted.stop()
    out["all"] = compared(yielded, source, manifest)
    out["state_kept"] = same_state(before, global_state())
    out["manifest"] = [(name, tuple(shape), str(dtype)) for name, shape, dtype in manifest]
    del yielded

    to_rank_0 = list(export(destinations={0}, cpu=True))
    out["to_rank_0"] = compared(to_rank_0, source, manifest)
    out["state_kept_again"] = same_state(before, global_state())
    if case in INFERENCE_TP_CASES:
        out["inference_tp"] = inference_tp_slices(export, case, source, bridge.config.vocab_size)

    try:
        WeightExport(bridge, models, bucket_bytes=20_000)
    except WeightError as exc:
        out["bucket_error"] = str(exc)
    # The smallest bucket the error asks for: many buckets per stage, the same tensors.
    smallest = int(out["bucket_error"].rpartition(">= ")[2])
    counted = count_collectives()
    small = list(WeightExport(bridge, models, bucket_bytes=smallest)())
    out["small_buckets"] = {**compared(small, source, manifest), "collectives": counted.stop()}
    try:
        export(destinations={0, WORLD})
    except WeightError as exc:
        out["destination_error"] = str(exc)
    try:
        export(inference_tp=(0, 3))
    except WeightError as exc:
        out["inference_tp_error"] = str(exc)
    if "wrapped" in case:
        # Only the last stage's model has a parameter the spec cannot name: every rank still
        # says so (none is left waiting in a collective).
        inner = unwrap(models[-1])
        last = parallel_state.is_pipeline_last_stage()
        if last:
            inner.register_parameter("bogus_scale", torch.nn.Parameter(torch.ones(1, dtype=dtype)))
        try:
            WeightExport(bridge, models)
        except WeightError as exc:
            out["name_error"] = str(exc)
        if last:
            del inner._parameters["bogus_scale"]
    return out


INFERENCE_TP_CASES = ("llama-tp2-pp2", "moe-tp2-ep2-etp2", "stacked-ep2-pp2-uneven")


def inference_tp_slices(
    export: Any, case: str, source: dict[str, torch.Tensor], vocab: int
) -> dict[str, Any]:
    """Sync with ``inference_tp=(k, K)`` for every k of K = 2 and 4 to rank 0: each yielded
    tensor against vLLM's slice of the HF source (tests/test_inference_tp.py), and the bytes
    each inference rank receives."""
    from test_inference_tp import expected_slice

    full = sum(t.nbytes for t in source.values())
    out: dict[str, Any] = {"full_bytes": full, "wrong": [], "bytes": {}, "as_manifest": True}
    for count in (2, 4):
        received = []
        for k in range(count):
            yielded = list(export(destinations={0}, cpu=True, inference_tp=(k, count)))
            manifest = export.manifest(inference_tp=(k, count))
            out["as_manifest"] &= [(n, t.shape, t.dtype) for n, t in yielded] == (manifest if yielded else [])
            for name, tensor in yielded:
                found = expected_slice(
                    name,
                    tuple(source[name].shape),
                    k,
                    count,
                    vocab,
                    transposed_layout=case.startswith("stacked"),
                )
                want = (
                    source[name]
                    if found is None
                    else source[name].narrow(found[0], found[1], found[2] - found[1])
                )
                if tensor.device.type != "cpu" or not torch.equal(tensor, want):
                    out["wrong"].append((count, k, name))
            received.append(sum(t.nbytes for _, t in yielded))
        out["bytes"][count] = received
    return out


class count_collectives:  # noqa: N801 - used like a function
    """Counts all_gathers on the tensor-, expert-tensor- and expert-parallel groups and pipeline
    broadcasts (the test's own wrapping of torch.distributed, undone by ``stop``)."""

    def __init__(self) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.dist = dist
        self.real = (dist.all_gather, dist.all_gather_into_tensor, dist.broadcast)
        self.counts = {"tp_all_gather": 0, "etp_all_gather": 0, "ep_all_gather": 0, "pp_broadcast": 0}
        groups = {
            "tp_all_gather": ps.get_tensor_model_parallel_group(),
            "etp_all_gather": ps.get_expert_tensor_parallel_group(),
            "ep_all_gather": ps.get_expert_model_parallel_group(),
        }
        pp = ps.get_pipeline_model_parallel_group()
        all_gather, all_gather_into_tensor, broadcast = self.real

        def count(group: Any) -> None:
            for key, known in groups.items():
                if group is known:
                    self.counts[key] += 1
                    return

        def counting_all_gather(*args: Any, **kwargs: Any) -> Any:
            count(kwargs.get("group"))
            return all_gather(*args, **kwargs)

        def counting_all_gather_into_tensor(*args: Any, **kwargs: Any) -> Any:
            count(kwargs.get("group"))
            return all_gather_into_tensor(*args, **kwargs)

        def counting_broadcast(*args: Any, **kwargs: Any) -> Any:
            self.counts["pp_broadcast"] += kwargs.get("group") is pp
            return broadcast(*args, **kwargs)

        dist.all_gather, dist.all_gather_into_tensor, dist.broadcast = (
            counting_all_gather,
            counting_all_gather_into_tensor,
            counting_broadcast,
        )

    def stop(self) -> dict[str, int]:
        self.dist.all_gather, self.dist.all_gather_into_tensor, self.dist.broadcast = self.real
        return self.counts


def sync_every_case(folders: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    return {case: sync_case(case, *folders[model]) for case, (model, _) in CASES.items()}


# ------------------------------------------------------------------ fixture


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import test_layouts

    root = tmp_path_factory.mktemp("weight_sync")
    test_layouts.to_layout_storage(test_layouts.make_qwen3_moe(root / "per_expert"), root / "stacked")
    folders = {
        "llama": (make_llama(root / "llama", torch.float32, tied=False), None),
        "llama_bf16_tied": (make_llama(root / "llama_bf16_tied", torch.bfloat16, tied=True), None),
        "moe": (make_moe(root / "moe"), None),
        "stacked": (str(root / "stacked"), test_layouts.layout_bridge_file(root / "project")),
    }
    results: list[dict[str, Any]] = run_on_ranks(sync_every_case, WORLD, folders)
    return results


# ------------------------------------------------------------------ multi-process tests


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_gets_every_tensor_bit_exact_in_manifest_order(
    case: str, synced: list[dict[str, Any]]
) -> None:
    manifests = [result[case]["manifest"] for result in synced]
    assert all(m == manifests[0] for m in manifests)  # the same on every rank
    for result in synced:
        found = result[case]["all"]
        assert found["unequal"] == [] and found["missing"] == [] and found["repeated"] == 0, (
            result[case]["rank"],
            found,
        )
        assert found["as_manifest"], result[case]["rank"]
        assert found["devices"] == ["cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_destinations_receive_and_the_others_yield_nothing(case: str, synced: list[dict[str, Any]]) -> None:
    first, *others = synced
    found = first[case]["to_rank_0"]
    assert found["unequal"] == [] and found["missing"] == [] and found["as_manifest"]
    assert [other[case]["to_rank_0"]["names"] for other in others] == [[]] * (WORLD - 1)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_sync_changes_no_global_state(case: str, synced: list[dict[str, Any]]) -> None:
    assert all(result[case]["state_kept"] and result[case]["state_kept_again"] for result in synced)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_smallest_bucket_moves_the_same_tensors_in_more_broadcasts(
    case: str, synced: list[dict[str, Any]]
) -> None:
    for result in synced:
        small, default = result[case]["small_buckets"], result[case]["all"]
        assert small["unequal"] == [] and small["missing"] == [] and small["as_manifest"]
        assert small["names"] == default["names"]
        if "pp2" in case:
            assert small["collectives"]["pp_broadcast"] > result[case]["collectives"]["pp_broadcast"]


@pytest.mark.slow
@pytest.mark.parametrize("case", INFERENCE_TP_CASES)
def test_inference_tp_yields_each_ranks_slice_and_about_a_kth_of_the_bytes(
    case: str, synced: list[dict[str, Any]]
) -> None:
    """``inference_tp=(k, K)``: rank 0 receives exactly vLLM's TP-rank-k slice of every HF
    tensor, shaped as ``manifest(inference_tp=...)`` says; the other ranks take part only."""
    found = synced[0][case]["inference_tp"]
    assert found["wrong"] == [] and found["as_manifest"]
    full = found["full_bytes"]
    for count, received in found["bytes"].items():
        print(f"{case} inference TP {count}: bytes per receiving rank {received} of {full} "
              f"({[round(r / full, 3) for r in received]})")  # fmt: skip
        assert sum(received) >= full and all(r <= full / count * 1.3 for r in received)
    for other in synced[1:]:
        assert other[case]["inference_tp"]["bytes"] == {2: [0, 0], 4: [0, 0, 0, 0]}


@pytest.mark.slow
def test_inference_tp_that_does_not_split_is_refused_before_anything_moves(
    synced: list[dict[str, Any]],
) -> None:
    assert {result["llama-tp2-pp2"]["inference_tp_error"] for result in synced} == {
        "weight sync: model.embed_tokens.weight (inference TP): vocabulary padded to 256 (a multiple of 64) "
        "does not split evenly over inference TP size 3"
    }


@pytest.mark.slow
def test_destinations_outside_the_job_are_refused(synced: list[dict[str, Any]]) -> None:
    assert {result["llama-tp2-pp2"]["destination_error"] for result in synced} == {
        f"weight sync: destinations [{WORLD}] are not ranks of this job (world size {WORLD})"
    }


@pytest.mark.slow
def test_hf_order_follows_the_layers_across_virtual_stages(synced: list[dict[str, Any]]) -> None:
    names = [name for name, _, _ in synced[0]["llama-pp2-vpp2"]["manifest"]]
    layers = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layers == sorted(layers) and sorted(set(layers)) == [0, 1, 2, 3]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "per_rank"),
    [
        ("moe-ep2-pp2", [1, 1, 1, 1]),  # stage 0 holds MoE layer 1, stage 1 MoE layers 2 and 3
        ("moe-tp2-ep2-etp2", [1, 1, 1, 1]),
        ("stacked-ep2-pp2-uneven", [0, 0, 1, 1]),  # stage 0 holds the dense layer 0 alone
    ],
)
def test_experts_of_a_layer_move_in_one_collective(
    case: str, per_rank: list[int], synced: list[dict[str, Any]]
) -> None:
    """One expert-parallel all_gather per bucket (here: per stage) holding MoE layers, never
    one per expert or per layer; one tensor-parallel all_gather per bucket for all its split
    tensors (and one on the expert-TP group); with pipeline stages, a few broadcasts (buckets
    of tensors), not one per tensor."""
    counts = [result[case]["collectives"] for result in synced]
    assert sorted(c["ep_all_gather"] for c in counts) == per_rank
    tp2, etp2 = "tp2" in case, "etp2" in case
    for c in counts:
        assert c["tp_all_gather"] == (1 if tp2 else 0)
        assert c["etp_all_gather"] == (1 if etp2 else 0)
    tensors = len(synced[0][case]["manifest"])
    for c in counts:
        assert 0 < c["pp_broadcast"] < tensors // 4 if "pp2" in case else c["pp_broadcast"] == 0


@pytest.mark.slow
def test_wrapped_model_reads_the_same_and_an_unnamed_parameter_is_one_line(
    synced: list[dict[str, Any]],
) -> None:
    said = {
        rank: result["llama-bf16-tied-wrapped-tp2-pp2"]["name_error"] for rank, result in enumerate(synced)
    }
    assert (
        said[2]
        == said[3]
        == (
            "weight sync, model chunk 0: Megatron tensor 'bogus_scale' has no rule in the llama spec "
            "(add it to the spec's weights, or this architecture variant is not supported yet)"
        )
    )  # named as the unwrapped model names it, without module.module.
    assert said[0] == said[1] == f"{said[2]} (on rank 2)"  # the first stage's ranks


@pytest.mark.slow
def test_a_bucket_smaller_than_the_largest_tensor_is_one_line(synced: list[dict[str, Any]]) -> None:
    fc1 = 2 * 128 * 64 * 4  # gate and up in one Megatron tensor, float32: the largest dense one
    experts = EXPERTS * (2 * 32 * 64 + 64 * 32) * 4  # one layer's gate, up and down, float32
    for result in synced:
        dense, moe = result["llama-tp2-pp2"]["bucket_error"], result["moe-tp2-ep2-etp2"]["bucket_error"]
        assert "\n" not in dense and "\n" not in moe
        assert dense == (
            "weight sync: bucket_bytes 20000 is smaller than the largest tensor, HF 'model.layers.0.mlp.gate_proj.weight', "
            f"'model.layers.0.mlp.up_proj.weight' ({fc1} bytes; Megatron 'decoder.layers.0.mlp.linear_fc1.weight' of "
            f"pipeline stage 0): pass bucket_bytes >= {fc1}"
        )
        assert moe.startswith(
            "weight sync: bucket_bytes 20000 is smaller than the largest tensor, HF "
            "'model.layers.1.mlp.experts.0.gate_proj.weight', 'model.layers.1.mlp.experts.0.up_proj.weight', "
            f"'model.layers.1.mlp.experts.0.down_proj.weight' and {3 * EXPERTS - 3} more ({experts} bytes; "
            "the experts of one layer, moved in one piece)"
        )


# ------------------------------------------------------------------ single-process tests


def test_expert_numbers_are_renumbered_by_the_rule() -> None:
    from bridgegen.plan.conversion import Conversion

    weight_map = Conversion.from_hf_config(qwen3_moe_config().to_dict()).weight_map()
    name = "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    assert (
        renumber_expert(weight_map, name, 3)
        == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    )
    # The layer number equal to the expert number is left alone.
    assert weight_map.match(renumber_expert(weight_map, name, 2), 5).layer == 6
    with pytest.raises(WeightError, match="not an expert tensor"):
        renumber_expert(weight_map, "decoder.layers.1.self_attention.linear_qkv.weight", 2)


def test_packing_and_buckets() -> None:
    tensors = (SyncTensor("a", (3,), torch.bfloat16), SyncTensor("b", (2, 2), torch.float32))
    offsets, size = packed_offsets(tensors)
    assert offsets == [0, ALIGN] and size == ALIGN + 16
    units = [
        SyncUnit(0, 0, 0, tensors),
        SyncUnit(0, 0, 0, tensors[:1]),
        SyncUnit(1, 0, 2, tensors[:1]),
        SyncUnit(1, 0, 2, tensors),
    ]
    # Unit 3 after unit 2 packs to 144 bytes; units 0 and 1 to 134; stage 0 and 1 never share.
    assert buckets(units, 2 * ALIGN + 16) == [[0, 1], [2, 3]]
    assert buckets(units, 2 * ALIGN + 5) == [[0], [1], [2], [3]]


def test_unwrap_follows_module_attributes() -> None:
    inner = torch.nn.Linear(2, 2)
    assert unwrap(ModuleWrapper(ModuleWrapper(inner))) is inner
    with pytest.raises(WeightError, match="must be a torch.nn.Module"):
        unwrap(object())
    from bridgegen.engines.distributed import ModelChunk

    assert unwrap(ModelChunk(ModuleWrapper(inner), None, 0)) is inner  # build_chunks' chunks too


def test_the_engine_needs_no_cpu_patches() -> None:
    """The architecture's promise: weight sync uses neither ensure_model_parallel nor cpu_support."""
    code = (
        "import sys, bridgegen.engines.weight_sync; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('bridgegen.megatron'))))"
    )
    found = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    assert json.loads(found.stdout) == []
