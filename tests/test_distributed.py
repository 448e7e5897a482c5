"""Conversion at TP / PP / VPP layouts on several gloo processes (CPU).

Each case spawns its ranks with bridgegen.engines.launch.run_on_ranks; the functions they run
live in tests/dist_cases.py. Models are tiny (4 layers, hidden 64) so 2 cores suffice.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dist_cases
import pytest
import torch
from checkpoints import assert_bit_exact, tensors_of

from bridgegen.engines.launch import RankErrors, run_on_ranks

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

VOCAB = 250
LOGIT_ATOL = 1e-5


def make_model(folder: Path, tied: bool) -> Path:
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
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny untied and tied Llamas, and HF reference logits for the shared tokens."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dist")
    out: dict[str, Any] = {}
    for name, tied in (("untied", False), ("tied", True)):
        folder = make_model(root / name, tied)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        hf.train(False)
        with torch.no_grad():
            out[name] = (folder, hf(dist_cases.tokens(VOCAB)).logits.float())
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def tp1(models: dict[str, Any]) -> dict[str, Any]:
    """The single-rank result every layout is compared with."""
    folder, reference = models["untied"]
    out = models["root"] / "tp1-export"
    checkpoint = models["root"] / "tp1-checkpoint"
    (result,) = run_on_ranks(dist_cases.convert, 1, str(folder), str(out), {}, str(checkpoint))
    assert (result["logits"] - reference).abs().max().item() <= LOGIT_ATOL
    return {"logits": result["logits"], "export": out, "checkpoint": checkpoint}


LAYOUTS = {
    "tp2": {"tp": 2},
    "pp2": {"pp": 2},
    "tp2-pp2": {"tp": 2, "pp": 2},
    "pp2-vpp2": {"pp": 2, "vpp": 2},
    "pp2-uneven": {"pp": 2, "first_stage_layers": 1, "last_stage_layers": 3},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_tp1_and_round_trips(
    layout: str, models: dict[str, Any], tp1: dict[str, Any], tmp_path: Path
) -> None:
    folder, reference = models["untied"]
    spec = LAYOUTS[layout]
    world = spec.get("tp", 1) * spec.get("pp", 1)
    results = run_on_ranks(dist_cases.convert, world, str(folder), str(tmp_path / "out"), spec)
    logits = [r["logits"] for r in results if r["logits"] is not None]
    assert len(logits) == spec.get("tp", 1)  # every TP rank of the last stage holds full logits
    for found in logits:
        diff = (found - tp1["logits"]).abs().max().item()
        print(f"{layout}: max|diff| vs TP=1 {diff:.3e}, vs HF {(found - reference).abs().max().item():.3e}")
        assert diff <= LOGIT_ATOL
        assert torch.equal(found.argmax(-1), reference.argmax(-1))
    assert_bit_exact(folder, tmp_path / "out")
    # Several pipeline stages each write their own shards; one index covers them all.
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tied_embeddings_across_layouts(layout: str, models: dict[str, Any], tmp_path: Path) -> None:
    folder, reference = models["tied"]
    spec = LAYOUTS[layout]
    world = spec.get("tp", 1) * spec.get("pp", 1)
    results = run_on_ranks(dist_cases.convert, world, str(folder), str(tmp_path / "out"), spec)
    for found in (r["logits"] for r in results if r["logits"] is not None):
        assert (found - reference).abs().max().item() <= LOGIT_ATOL
    assert "lm_head.weight" not in tensors_of(tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")


def test_tp2_reads_only_its_half(models: dict[str, Any], tmp_path: Path) -> None:
    folder, _ = models["untied"]
    results = run_on_ranks(dist_cases.convert, 2, str(folder), str(tmp_path / "out"), {"tp": 2})
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors_of(folder).values())
    per_rank = [r["bytes_requested"] for r in results]
    amplification = sum(per_rank) / tensor_bytes
    print(f"TP=2 bytes requested per rank {per_rank}, total / checkpoint = {amplification:.4f}")
    assert amplification <= 1.05
    assert max(per_rank) <= 0.55 * tensor_bytes


def test_dist_checkpoint_at_tp2_exports_like_tp1(
    models: dict[str, Any], tp1: dict[str, Any], tmp_path: Path
) -> None:
    folder, _ = models["untied"]
    checkpoint = tmp_path / "tp2-checkpoint"
    run_on_ranks(dist_cases.convert, 2, str(folder), str(tmp_path / "unused"), {"tp": 2}, str(checkpoint))
    assert (checkpoint / "bridgegen.json").is_file()
    # Export each checkpoint at a layout other than the one it was saved at.
    run_on_ranks(dist_cases.export_checkpoint, 1, str(checkpoint), str(tmp_path / "from-tp2"), {})
    run_on_ranks(
        dist_cases.export_checkpoint, 2, str(tp1["checkpoint"]), str(tmp_path / "from-tp1"), {"pp": 2}
    )
    a, b = tensors_of(tmp_path / "from-tp2"), tensors_of(tmp_path / "from-tp1")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_bit_exact(folder, tmp_path / "from-tp2")


@pytest.mark.parametrize(
    ("when", "layout"),
    [("import", {"tp": 2}), ("export", {"tp": 2}), ("export", {"pp": 2}), ("save", {"tp": 2})],
)
def test_one_rank_failing_stops_all_and_leaves_nothing(
    when: str, layout: dict[str, int], models: dict[str, Any], tmp_path: Path
) -> None:
    folder, _ = models["untied"]
    out = tmp_path / "out"
    # Any error a rank raises comes back as its own one-line reason (RankErrors).
    with pytest.raises(RankErrors, match=r"rank 1: \w+: rank 1 fails"):
        run_on_ranks(dist_cases.fail_on_rank_1, 2, str(folder), str(out), layout, when)
    assert not out.exists()
    from bridgegen.formats.folders import remove_partial_outputs

    # A rank killed while blocked in a collective cannot clean up; what it may leave is a
    # hidden temp folder, which the launcher (or the next run) removes.
    remove_partial_outputs(out)
    assert dist_cases.leftovers(tmp_path) == []


def test_cli_runs_a_layout_on_local_processes(models: dict[str, Any], tmp_path: Path) -> None:
    from bridgegen.cli.main import main

    folder, _ = models["untied"]
    checkpoint, out = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["import", "--hf", str(folder), "--out", str(checkpoint), "--tp", "2"]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out), "--pp", "2"]) == 0
    assert_bit_exact(folder, out)
    assert main(["verify", "--hf", str(out), "--megatron", str(checkpoint), "--tp", "2", "--pp", "2"]) == 0
    # An existing output is refused on every rank, and nothing is changed.
    assert main(["import", "--hf", str(folder), "--out", str(checkpoint), "--tp", "2"]) == 2
    shutil.rmtree(out)


def test_a_finished_rank_ends_its_groups_and_skips_the_teardown(tmp_path: Path) -> None:
    """A rank that is done drops megatron-core's and torch's process groups, then leaves
    without the interpreter's teardown (no exit handler runs): gloo threads of groups that
    outlive it have aborted finished ranks there (SIGABRT, "terminate called without an
    active exception")."""
    results = run_on_ranks(dist_cases.finish_with_an_exit_handler, 2, str(tmp_path))
    assert results == [(0, False, False), (1, False, False)]
    assert list(tmp_path.iterdir()) == []

