"""Weight load into a live model (bridgegen.engines.weight_load), the inverse of weight sync, on
4 gloo processes (CPU).

For each layout the ranks load a model from HF weights A and sync it (``WeightExport``), load a
second model of the same layout from other weights B, load A's synced tensors into it with
``load_weights`` (streamed, then from A's folder) and sync again: bit-exact A. One spawn runs
every layout; the tests read its results.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

WORLD = 4

# name -> (model, layout)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-tp2-pp2": ("llama", {"tp": 2, "pp": 2}),
    "moe-ep2": ("moe", {"ep": 2}),
}


def other_weights(source: str, target: Path) -> str:
    """A copy of HF folder ``source`` with every tensor drawn anew (same names and shapes)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(1)
    for file in sorted(target.glob("*.safetensors")):
        tensors = load_file(file)
        drawn = {
            n: torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)
            for n, t in tensors.items()
        }
        save_file(drawn, str(file), metadata={"format": "pt"})
    return str(target)


def hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def unequal(yielded: list[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor]) -> list[str]:
    names = [n for n, _ in yielded]
    wrong = [
        n
        for n, t in yielded
        if n not in expected or t.dtype != expected[n].dtype or not torch.equal(t, expected[n])
    ]
    return wrong + sorted(set(expected) - set(names))


def load_case(case: str, folder_a: str, folder_b: str) -> dict[str, Any]:
    import dist_cases
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridgegen.bridge.errors import WeightError
    from bridgegen.engines.distributed import ParallelLayout, build_chunks, load_hf
    from bridgegen.engines.weight_load import load_weights
    from bridgegen.engines.weight_sync import WeightExport

    _, layout = CASES[case]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    bridge = dist_cases.model_bridge(folder_a)
    source_a = hf_tensors(folder_a)
    dtype = next(iter(source_a.values())).dtype
    out: dict[str, Any] = {"rank": dist.get_rank()}

    chunks_a = build_chunks(bridge, ParallelLayout(**layout), dtype)
    load_hf(bridge, chunks_a, folder_a)
    synced_a = [(n, t.clone()) for n, t in WeightExport(bridge, [c.model for c in chunks_a])()]
    out["a_synced"] = unequal(synced_a, source_a)

    chunks_b = build_chunks(bridge, ParallelLayout(**layout), dtype)
    load_hf(bridge, chunks_b, folder_b)
    export_b = WeightExport(bridge, [c.model for c in chunks_b])
    out["b_differs"] = len(unequal(list(export_b()), source_a))

    # Streamed: a generator, every rank given the same whole tensors.
    stats = load_weights(bridge, chunks_b, (item for item in synced_a))
    out["streamed"] = unequal(list(export_b()), source_a)
    full = sum(t.nbytes for t in source_a.values())
    out["read_share"] = stats.bytes_requested / full

    load_hf(bridge, chunks_b, folder_b)
    load_weights(bridge, chunks_b, folder_a)  # from the folder: only this rank's slices read
    out["from_folder"] = unequal(list(export_b()), source_a)

    try:
        load_weights(bridge, chunks_b, [*synced_a, ("model.layers.0.bogus.weight", torch.zeros(1))])
    except WeightError as exc:
        out["unexpected_error"] = str(exc)
    try:
        load_weights(bridge, chunks_b, [(n, t) for n, t in synced_a if n != "model.norm.weight"])
        out["missing_error"] = None
    except WeightError as exc:
        out["missing_error"] = str(exc)
    return out


def load_every_case(folders: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {case: load_case(case, *folders[model]) for case, (model, _) in CASES.items()}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import test_weight_sync

    from bridgegen.engines.launch import run_on_ranks

    root = tmp_path_factory.mktemp("weight_load")
    llama = test_weight_sync.make_llama(root / "llama", torch.float32, tied=False)
    moe = test_weight_sync.make_moe(root / "moe")
    folders = {
        "llama": (llama, other_weights(llama, root / "llama_b")),
        "moe": (moe, other_weights(moe, root / "moe_b")),
    }
    assert json.loads((Path(llama) / "config.json").read_text())["model_type"] == "llama"
    results: list[dict[str, Any]] = run_on_ranks(load_every_case, WORLD, folders)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_loading_synced_tensors_gives_back_the_model_bit_exact(
    case: str, loaded: list[dict[str, Any]]
) -> None:
    for result in loaded:
        found = result[case]
        assert found["a_synced"] == [] and found["b_differs"] > 0, found["rank"]
        assert found["streamed"] == [], (found["rank"], found["streamed"])
        assert found["from_folder"] == [], (found["rank"], found["from_folder"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "most"),
    # TP2 x PP2: a quarter each (norms and q/k norms whole); EP2: half the experts, the dense
    # rest (embedding, attention, layer 0's MLP, lm_head: ~60% of this tiny model) whole.
    [("llama-tp2-pp2", 0.26), ("moe-ep2", 0.8)],
)
def test_each_rank_copies_only_its_slices(case: str, most: float, loaded: list[dict[str, Any]]) -> None:
    shares = [round(result[case]["read_share"], 3) for result in loaded]
    print(f"{case}: share of the model each rank copied from the streamed tensors {shares}")
    assert all(0 < share <= most for share in shares)


@pytest.mark.slow
def test_an_unknown_or_missing_tensor_is_one_line(loaded: list[dict[str, Any]]) -> None:
    for result in loaded:
        found = result["llama-tp2-pp2"]
        assert found["unexpected_error"] == (
            "weight load: unexpected tensor(s) 'model.layers.0.bogus.weight': the llama spec maps no Megatron "
            "tensor to them"
        )
    # The final norm is held by the last pipeline stage (ranks 2 and 3) only.
    said = [result["llama-tp2-pp2"]["missing_error"] for result in loaded]
    assert said[:2] == [None, None]
    assert (
        said[2]
        == said[3]
        == ("weight load: missing HF tensor(s) 'model.norm.weight', needed by this rank's parameters")
    )
