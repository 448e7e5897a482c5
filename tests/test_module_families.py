"""Granite and OLMo 2, the first families with runtime modules, from their norms drawn around 1
(where a misplaced norm shows): a bit-exact round trip through ``bridgegen import`` / ``export``
that loads in transformers, a config round trip, Granite's multipliers each needed. Every family
with modules also runs tests/test_families.py from its example config.

OLMo 2's q/k norms span all heads, so they are also checked at tensor parallel size 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dist_cases
import pytest
import torch
from bridgegen.generated import BRIDGES
from checkpoints import assert_bit_exact, tensors_of

from bridgegen.bridge.base import Bridge
from bridgegen.engines.launch import run_on_ranks

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

LOGIT_ATOL = 1e-5  # fp32 max |HF - Megatron| over every logit

# The families these module-specific checks were written for; every family, with or without
# modules, also runs tests/test_families.py from its example config.
MODULE_FAMILIES = {
    bridge.family: bridge
    for bridge in BRIDGES
    if bridge.family in {"granite", "olmo2"} and bridge.runtime_modules and bridge.example_config
}


def test_the_new_families_are_covered() -> None:
    assert {"granite", "olmo2"} <= set(MODULE_FAMILIES)


def hf_config(bridge: type[Bridge], **changes: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(bridge.model_types[0], **{**bridge.example_config, **changes})


def save_tiny(bridge: type[Bridge], folder: Path, **changes: Any) -> Any:
    """A random tiny model of the family, saved to ``folder``, ready to run. Norm weights are
    drawn around 1 (transformers starts them at exactly 1, where a misplaced norm would not
    show)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(bridge, **changes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    model.save_pretrained(folder)
    model.train(False)
    return model


def vocab(bridge: type[Bridge]) -> int:
    return int(bridge.example_config["vocab_size"])


@pytest.mark.parametrize("family", sorted(MODULE_FAMILIES))
def test_import_export_is_bit_exact_and_loads_in_transformers(family: str, tmp_path: Path) -> None:
    """Through the CLI and a Megatron dist checkpoint; the Megatron-LM arguments the import
    prints list every module the model needs under "Not in Megatron-LM"; the export loads with
    transformers 5.24's ``AutoModelForCausalLM.from_pretrained``
    (transformers/models/auto/auto_factory.py:261, transformers/modeling_utils.py:3903) and computes the original model's logits exactly."""
    from transformers import AutoModelForCausalLM

    from bridgegen.cli.main import main
    from bridgegen.engines.model import ModelBridge

    bridge = MODULE_FAMILIES[family]
    hf = save_tiny(bridge, tmp_path / "hf")
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(checkpoint)]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out)]) == 0
    assert_bit_exact(tmp_path / "hf", out)
    arguments = (checkpoint / "megatron_lm_args.txt").read_text()
    for parameters in ModelBridge.from_hf_dir(tmp_path / "hf").runtime_modules():
        assert f"#   - {parameters.megatron_lm_gap()}\n" in arguments
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    exported.train(False)
    assert type(exported) is type(hf)
    tokens = dist_cases.tokens(vocab(bridge))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize("family", sorted(MODULE_FAMILIES))
def test_config_round_trip(family: str, tmp_path: Path) -> None:
    """HF config -> Megatron config -> HF config gives back every field of the example, and
    every field transformers' config class writes that the bridge maps."""
    bridge = MODULE_FAMILIES[family]
    original = hf_config(bridge, architectures=[bridge.architectures[0]]).to_dict()
    back = bridge.to_hf_config(bridge.to_megatron_config(original))
    for name, value in bridge.example_config.items():
        assert back[name] == value, name
    for name in sorted(set(back) & set(original)):
        assert back[name] == original[name], name
    rebuilt = hf_config(bridge, **{k: v for k, v in back.items() if k in bridge.example_config})
    assert json.loads(rebuilt.to_json_string()) == json.loads(hf_config(bridge).to_json_string())


def test_granite_example_needs_every_multiplier() -> None:
    """Each Granite quirk moves HF's logits by more than 1e-3 at the example's values, so the
    parity test above fails if a module (or softmax_scale) is not applied."""
    from transformers import AutoModelForCausalLM

    bridge = MODULE_FAMILIES["granite"]
    tokens = dist_cases.tokens(vocab(bridge))

    def logits(**changes: Any) -> torch.Tensor:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config(bridge, **changes))
        model.train(False)
        with torch.no_grad():
            result: torch.Tensor = model(tokens).logits
        return result

    reference = logits()
    head_dim = bridge.example_config["hidden_size"] // bridge.example_config["num_attention_heads"]
    for neutral in (
        {"embedding_multiplier": 1.0},
        {"residual_multiplier": 1.0},
        {"logits_scaling": 1.0},
        {"attention_multiplier": head_dim**-0.5},
    ):
        assert (logits(**neutral) - reference).abs().max().item() > 1e-3, neutral


@pytest.fixture(scope="module")
def olmo2_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("olmo2") / "hf"
    hf = save_tiny(MODULE_FAMILIES["olmo2"], folder)
    with torch.no_grad():
        reference = hf(dist_cases.tokens(vocab(MODULE_FAMILIES["olmo2"]))).logits.float()
    return folder, reference


def test_olmo2_qk_norm_over_heads_at_tp2_matches_transformers(
    olmo2_folder: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    """Each TP rank holds half the heads, yet normalises q and k over all of them (normalising
    over its own heads only moved the logits by 0.38)."""
    folder, reference = olmo2_folder
    results = run_on_ranks(dist_cases.convert, 2, str(folder), str(tmp_path / "out"), {"tp": 2})
    for result in results:
        diff = (result["logits"] - reference).abs().max().item()
        print(f"olmo2 tp2: max|diff| vs HF {diff:.3e}")
        assert diff <= LOGIT_ATOL
    assert_bit_exact(folder, tmp_path / "out")


def test_olmo2_dist_checkpoint_at_tp2_round_trips(
    olmo2_folder: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    """CLI import at TP=2 writes each rank's half of q_norm / k_norm into the dist checkpoint;
    export at TP=1 puts the halves back together, bit-exact; models at TP=2 and TP=1 load the
    checkpoint (megatron-core's sharded_state_dict of the norms) and match HF's logits."""
    from bridgegen.cli.main import main

    folder, _ = olmo2_folder
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", str(folder), "--out", str(checkpoint), "--tp", "2"]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out)]) == 0
    assert_bit_exact(folder, out)
    q_norm = tensors_of(out)["model.layers.0.self_attn.q_norm.weight"]
    assert q_norm.shape == (bridge_width(MODULE_FAMILIES["olmo2"], "num_attention_heads"),)
    for tp in ("2", "1"):
        verify = ["verify", "--hf", str(folder), "--megatron", str(checkpoint), "--tp", tp, "--seq-len", "24"]
        assert main(verify) == 0


def bridge_width(bridge: type[Bridge], heads_field: str) -> int:
    config = bridge.example_config
    return int(config[heads_field]) * (int(config["hidden_size"]) // int(config["num_attention_heads"]))


def test_olmo2_refuses_tp_wider_than_its_key_value_heads(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """megatron-core would repeat one key/value head on both ranks; a norm over all heads of a
    repeated head is not OLMo 2's, so import at TP=2 with one key/value head is refused: by the
    command before any work, and by the key norm itself for a model built through the API."""
    from types import SimpleNamespace

    from bridgegen.bridge.errors import ConfigError
    from bridgegen.cli.main import main
    from bridgegen.megatron.modules import KeyNormOverHeads

    save_tiny(MODULE_FAMILIES["olmo2"], tmp_path / "hf", num_key_value_heads=1)
    code = main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--tp", "2"])
    assert code == 2
    assert "--tp 2 does not divide the 1 key/value heads (query groups)" in capfd.readouterr().err
    config = SimpleNamespace(num_query_groups=1, num_attention_heads=4, tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match="num_query_groups 1 does not split over tensor parallel size 2"):
        KeyNormOverHeads(config, hidden_size=16)
