"""Every family's parity, round-trip and config tests, from its spec's ``example_config``.

For each generated bridge, the tiny HF model its spec describes (``example_config``, with the
bridge's first architecture and model type) is built by transformers with seeded random float32
weights and saved. Then, through the command line as a user runs it:

* ``bridgegen import`` writes a Megatron checkpoint; a megatron-core model loaded from it gives
  the logits transformers gives, within ``LOGIT_ATOL`` (max abs, fp32), with the same argmax;
* ``bridgegen export`` writes an HF folder holding the source tensors bit for bit;
* the exported config, read by transformers, equals the source on every field the spec maps,
  and the exported model loads in transformers and gives the source model's logits exactly.

* at TP=2 (PP=2 where the example has one key/value head; EP=2 too for a mixture of experts),
  two local processes load the HF folder: the model gives transformers' logits, a weight sync
  out of it yields every HF tensor bit for bit, and its export equals the source bit for bit.

Adding a family adds these tests: a spec without ``example_config`` fails here. The bridges of
the folders ``BRIDGEGEN_BRIDGES`` names are run too, so a team can test its own specs here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import assert_bit_exact

from bridgegen.bridge.base import Bridge
from bridgegen.plan.bridges import all_bridges

BRIDGES = all_bridges()

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-5  # fp32 on both sides; the families' math needs no looser bound
SEQ = 24  # longer than the example configs' sliding windows
BATCH = 2

# Fields that say who wrote the file, not what the model is.
WRITER_FIELDS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


def _family(bridge: type[Bridge]) -> str:
    return bridge.family


@dataclass(frozen=True)
class Family:
    """A family's tiny HF model, saved, and what the CLI made of it."""

    bridge: type[Bridge]
    hf_dir: Path
    hf_model: Any
    checkpoint: Path
    exported: Path


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded values everywhere the checkpoint stores: norm weights move by std 0.1 from where
    transformers starts them (1, or 0 for Gemma's 1 + w norms, where a wrong offset would not
    show); every other weight, bias and stored buffer (a router's expert bias) gets std 0.1."""
    generator = torch.Generator().manual_seed(seed)
    stored = model.state_dict()
    with torch.no_grad():
        for name, tensor in sorted(stored.items()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(tensor + 0.1 * noise if "norm" in name else 0.1 * noise)


def build_hf_model(bridge: type[Bridge], folder: Path) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = bridge.example_hf_config()
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed=0)
    model.eval()
    model.save_pretrained(folder)
    return model


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(ids).logits.float()
    return logits


def test_every_spec_has_an_example_config() -> None:
    missing = [bridge.source_spec for bridge in BRIDGES if not bridge.example_config]
    assert not missing, f"no example_config (a tiny HF config of the family, run by these tests): {missing}"


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``families(bridge)``: the family's HF model, imported and exported by the CLI (cached)."""
    from bridgegen.cli.main import main

    cache: dict[str, Family] = {}

    def get(bridge: type[Bridge]) -> Family:
        if bridge.family not in cache:
            root = tmp_path_factory.mktemp(bridge.family)
            hf_dir, checkpoint, exported = root / "hf", root / "megatron", root / "exported"
            hf_model = build_hf_model(bridge, hf_dir)
            assert main(["import", "--hf", str(hf_dir), "--out", str(checkpoint)]) == 0
            assert main(["export", "--megatron", str(checkpoint), "--out", str(exported)]) == 0
            cache[bridge.family] = Family(bridge, hf_dir, hf_model, checkpoint, exported)
        return cache[bridge.family]

    return get


FAMILIES = [bridge for bridge in BRIDGES if bridge.example_config]


@pytest.mark.parametrize("bridge", FAMILIES, ids=_family)
def test_example_config_is_served_by_its_bridge(bridge: type[Bridge]) -> None:
    from bridgegen.plan.bridges import bridge_for_config

    assert bridge_for_config(bridge.example_hf_config()) is bridge  # built-in and outside bridges


@pytest.mark.parametrize("bridge", FAMILIES, ids=_family)
def test_logits_parity_fp32(families: Any, bridge: type[Bridge]) -> None:
    """A megatron-core model loaded from the imported checkpoint against transformers."""
    from bridgegen.engines.checkpoint import load_megatron
    from bridgegen.engines.model import bridge_for_checkpoint
    from bridgegen.engines.verify import compare, megatron_logits

    family = families(bridge)
    loaded, dtype = bridge_for_checkpoint(family.checkpoint)
    assert loaded.bridge is bridge and dtype == torch.float32
    model = loaded.build_model(dtype)
    load_megatron(model, family.checkpoint)
    vocab = int(bridge.example_config["vocab_size"])
    ids = tokens(vocab)
    reference = hf_logits(family.hf_model, ids)
    parity = compare(reference, megatron_logits(model, ids, vocab))
    print(f"\n{bridge.family}: {parity}; max|logit| {reference.abs().max().item():.2f}")
    assert reference.abs().max() > 0.5, "logits this small would make the comparison vacuous"
    assert parity.max_abs_diff <= LOGIT_ATOL
    assert parity.argmax_agreement == 1.0


@pytest.mark.parametrize("bridge", FAMILIES, ids=_family)
def test_round_trip_is_bit_exact(families: Any, bridge: type[Bridge]) -> None:
    family = families(bridge)
    assert_bit_exact(family.hf_dir, family.exported)


def mapped_fields(bridge: type[Bridge], config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a transformers config dict that the spec maps."""
    return {name: config[name] for name in bridge.hf_fields if name in config}


def loaded_config(folder: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    config: dict[str, Any] = AutoConfig.from_pretrained(folder).to_dict()
    for name in WRITER_FIELDS:
        config.pop(name, None)
    return config


@pytest.mark.parametrize("bridge", FAMILIES, ids=_family)
def test_config_round_trip(families: Any, bridge: type[Bridge]) -> None:
    """The exported config.json, read by transformers, has the source's value for every field
    the spec maps that the source holds (a field the source leaves out is read at the spec's
    default, which the export may write out: both read as the same Megatron config), and the
    exported model loads and computes the source model's logits."""
    from transformers import AutoModelForCausalLM

    family = families(bridge)
    source, exported = loaded_config(family.hf_dir), loaded_config(family.exported)
    written = json.loads((family.exported / "config.json").read_text())
    assert written["architectures"] == [bridge.architectures[0]]
    assert written["model_type"] == bridge.model_types[0]
    mapped = mapped_fields(bridge, source)
    assert {name: exported.get(name) for name in mapped} == mapped
    source_json = json.loads((family.hf_dir / "config.json").read_text())
    assert bridge.to_megatron_config(written).values == bridge.to_megatron_config(source_json).values
    reloaded = AutoModelForCausalLM.from_pretrained(family.exported, dtype=torch.float32)
    reloaded.eval()
    assert type(reloaded) is type(family.hf_model)
    ids = tokens(int(bridge.example_config["vocab_size"]))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(family.hf_model, ids))


def parallel_layout(bridge: type[Bridge]) -> dict[str, int]:
    """TP=2 (PP=2 where the example's single key/value head cannot split), with EP=2 (whole
    experts per rank) for a mixture of experts."""
    config = bridge.to_megatron_config(bridge.example_hf_config())
    groups = config.values.get("num_query_groups") or config.value("num_attention_heads")
    layout = {"tp": 2} if groups % 2 == 0 else {"pp": 2}
    if config.values.get("num_moe_experts"):
        layout |= {"ep": 2, "etp": 1}
    return layout


@pytest.mark.parametrize("bridge", FAMILIES, ids=_family)
def test_parallel_round_trip_and_weight_sync_are_bit_exact(
    families: Any, bridge: type[Bridge], tmp_path: Path
) -> None:
    """Two local processes at TP=2 (EP=2 for experts) load the HF folder; the model gives
    transformers' logits, a weight sync out of it (``WeightExport``, as RL frameworks call it)
    yields every HF tensor bit for bit, and its export (every rank writing its shards) equals
    the source bit for bit. (The CLI's import and export at these layouts, through a Megatron
    checkpoint, run in tests/test_distributed.py, tests/test_new_families.py and
    tests/test_outside_module.py.)"""
    import dist_cases

    from bridgegen.engines.launch import run_on_ranks
    from bridgegen.engines.verify import compare

    family = families(bridge)
    layout = parallel_layout(bridge)
    out = tmp_path / "out"
    ids = tokens(int(bridge.example_config["vocab_size"]))
    ranks = run_on_ranks(dist_cases.round_trip_and_sync, 2, str(family.hf_dir), str(out), layout, ids)
    (logits,) = [rank["logits"] for rank in ranks if rank["logits"] is not None][:1]
    parity = compare(hf_logits(family.hf_model, ids), logits)
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0, parity
    for rank in ranks:
        assert rank["unequal"] == [] and rank["missing"] == []
    assert_bit_exact(family.hf_dir, out)
