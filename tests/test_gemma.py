"""Gemma: RMSNorm with 1 + w (zero-centred gamma), embeddings scaled by sqrt(hidden_size),
gelu_pytorch_tanh, tied embeddings, head_dim independent of hidden / heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import assert_bit_exact

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

VOCAB = 250
LOGIT_ATOL = 1e-5


def make_gemma(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,  # not hidden / heads
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return saved(AutoModelForCausalLM.from_config(config), folder, dtype)


def saved(model: torch.nn.Module, folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, object]:
    """Save a freshly initialised model with random norm weights (HF initialises the (1 + w)
    norms at w = 0, where a wrong offset would not show) and return it ready to run."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(folder)
    model.train(False)
    return folder, model


def test_gemma_bf16_round_trip_is_bit_exact(tmp_path: Path) -> None:
    """bf16 on both sides (fp32 parity and round trip: tests/test_families.py)."""
    from bridgegen.engines.model import ModelBridge

    folder, _ = make_gemma(tmp_path / "hf", torch.bfloat16)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.activation == "gelu_tanh"
    assert bridge.config.value("share_embeddings_and_output_weights") is True
    model = bridge.build_model()
    bridge.load_hf_weights(model)
    bridge.export_hf(model, tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")  # norms keep w as HF stores it: exact in bf16 too


VARIANTS = {
    # caps below this tiny model's score range, so capping changes results; a window shorter
    # than the sequence on every second layer
    "gemma2": dict(attn_logit_softcapping=0.01, final_logit_softcapping=0.1, query_pre_attn_scalar=24),
    # q/k norms, local layers with their own RoPE base, one global layer in two
    "gemma3_text": dict(
        sliding_window_pattern=2, rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=24
    ),
    # linear RoPE scaling on the global layers only (as Gemma 3 27B)
    "gemma3_text_linear": dict(
        sliding_window_pattern=2,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    ),
}


# The text model of the Gemma 2 / 3 tests: a window shorter than the test sequences.
TINY_TEXT: dict[str, object] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    sliding_window=5,
)


def make_variant(folder: Path, name: str) -> tuple[Path, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(name.removesuffix("_linear"), **TINY_TEXT, **VARIANTS[name])
    torch.manual_seed(0)
    return saved(AutoModelForCausalLM.from_config(config), folder)


# gemma2 and gemma3_text as they are here are the specs' example configs' field sets, run by
# tests/test_families.py; linear RoPE scaling on the global layers only is run here.
@pytest.mark.parametrize("name", ["gemma3_text_linear"])
def test_gemma2_and_gemma3_parity_with_windows_longer_than_sliding(name: str, tmp_path: Path) -> None:
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    folder, hf = make_variant(tmp_path / "hf", name)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.value("window_size") == [4, 0]
    model = bridge.build_model(torch.float32)
    bridge.load_hf_weights(model)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))  # 24 > window 5
    with torch.no_grad():
        parity = compare(hf(tokens).logits.float(), megatron_logits(model, tokens, VOCAB))  # type: ignore[operator]
    print(f"{name}: {parity}")
    assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0
    bridge.export_hf(model, tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")


def test_softcapping_and_window_change_the_result(tmp_path: Path) -> None:
    """The quirks matter at this size: without them HF's logits move by more than 1e-2."""
    import json

    folder, hf = make_variant(tmp_path / "hf", "gemma2")
    plain = json.loads((folder / "config.json").read_text())
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    from transformers import AutoConfig, AutoModelForCausalLM

    for change in (
        {"attn_logit_softcapping": None},
        {"final_logit_softcapping": None},
        {"sliding_window": 64},
    ):
        config = AutoConfig.for_model(
            "gemma2", **{k: v for k, v in plain.items() if k != "model_type"} | change
        )
        other = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
        other.train(False)
        with torch.no_grad():
            moved = (other(tokens).logits - hf(tokens).logits).abs().max().item()  # type: ignore[operator]
        assert moved > 1e-2, change


def make_multimodal(folder: Path, *, tied: bool, dtype: torch.dtype = torch.float32) -> tuple[Path, object]:
    """A tiny Gemma3ForConditionalGeneration: a gemma3 text model saved as language_model.*,
    beside a SigLIP vision tower and the multimodal projector."""
    from transformers import AutoModelForImageTextToText, Gemma3Config

    text = TINY_TEXT | dict(sliding_window_pattern=2, query_pre_attn_scalar=24, tie_word_embeddings=tied)
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return saved(AutoModelForImageTextToText.from_config(config), folder, dtype)


@pytest.mark.parametrize(
    ("tied", "dtype"), [(True, torch.float32), (False, torch.float32), (False, torch.bfloat16)], ids=str
)
def test_multimodal_gemma3_text_parity_and_round_trip(tied: bool, dtype: torch.dtype, tmp_path: Path) -> None:
    import json

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import compare, megatron_logits

    folder, hf = make_multimodal(tmp_path / "hf", tied=tied, dtype=dtype)
    bridge = ModelBridge.from_hf_dir(folder)
    assert bridge.config.hf_architecture == "Gemma3ForConditionalGeneration"
    assert bridge.config.value("share_embeddings_and_output_weights") is tied
    model = bridge.build_model()
    stats = bridge.load_hf_weights(model)
    source = json.loads((folder / "config.json").read_text())
    # Only the language model's tensors are read: the vision tower stays on disk.
    text_tensors = [n for n in _tensor_names(folder) if n.startswith("language_model.")]
    assert stats.hf_tensors_used == len(text_tensors)
    bridge.export_hf(model, tmp_path / "out")
    assert_bit_exact(folder, tmp_path / "out")  # vision tower and projector included
    # The config transformers reads back is the source's (the text model's RoPE is written in
    # the shape every transformers version reads; its values are unchanged).
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k not in ("text_config", "torch_dtype")} == {
        k: v for k, v in source.items() if k not in ("text_config", "transformers_version")
    }
    assert _loaded_config(tmp_path / "out") == _loaded_config(folder)
    if dtype == torch.float32:
        tokens = torch.randint(0, VOCAB - 3, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            parity = compare(hf(input_ids=tokens).logits.float(), megatron_logits(model, tokens, VOCAB))  # type: ignore[operator]
        print(f"gemma3 multimodal (tied={tied}): {parity}")
        assert parity.max_abs_diff <= LOGIT_ATOL and parity.argmax_agreement == 1.0


def _loaded_config(folder: Path) -> dict[str, object]:
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(folder).to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        loaded.pop(volatile, None)
    return loaded


def _tensor_names(folder: Path) -> list[str]:
    from bridgegen.formats.safetensors import Checkpoint

    return Checkpoint.open(folder).names()


def test_multimodal_export_without_its_vision_tower_is_refused(tmp_path: Path) -> None:
    import json

    from bridgegen.bridge.errors import WeightError
    from bridgegen.engines.model import ModelBridge

    folder, _ = make_multimodal(tmp_path / "hf", tied=True)
    loaded = ModelBridge.from_hf_dir(folder)
    model = loaded.build_model()
    loaded.load_hf_weights(model)
    # From a config alone the vision tower's source is unknown.
    bare = ModelBridge.from_hf_config(json.loads((folder / "config.json").read_text()))
    with pytest.raises(WeightError, match=r"vision_tower\.\*, multi_modal_projector\.\* tensors"):
        bare.export_hf(model, tmp_path / "out")
    # A source folder holding only the language model cannot supply it either.
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    from safetensors.torch import save_file

    save_file({"language_model.model.norm.weight": torch.zeros(64)}, text_only / "model.safetensors")
    with pytest.raises(WeightError, match=r"text_only: holds no vision_tower\.\*"):
        ModelBridge(loaded.bridge, loaded.config, text_only).export_hf(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "text_only"]  # nothing partial left


def test_multimodal_export_in_bf16_casts_the_carried_tensors_too(tmp_path: Path) -> None:
    from checkpoints import tensors_of

    from bridgegen.engines.model import ModelBridge

    folder, _ = make_multimodal(tmp_path / "hf", tied=True)
    bridge = ModelBridge.from_hf_dir(folder)
    model = bridge.build_model()
    bridge.load_hf_weights(model)
    bridge.export_hf(model, tmp_path / "out", dtype="bf16")
    source, exported = tensors_of(folder), tensors_of(tmp_path / "out")
    assert sorted(source) == sorted(exported)
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16, name
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


def test_multimodal_import_names_an_unknown_tensor(tmp_path: Path) -> None:
    """Tensors outside the language model are carried only under the spec's prefixes."""
    from safetensors.torch import load_file, save_file

    from bridgegen.bridge.errors import WeightError
    from bridgegen.engines.model import ModelBridge

    folder, _ = make_multimodal(tmp_path / "hf", tied=True)
    tensors = load_file(folder / "model.safetensors")
    tensors["audio_tower.proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "model.safetensors")
    bridge = ModelBridge.from_hf_dir(folder)
    with pytest.raises(WeightError, match=r"unexpected tensor\(s\) 'audio_tower.proj.weight'"):
        bridge.load_hf_weights(bridge.build_model())


def test_multimodal_through_a_dist_checkpoint_at_tp2_pp2(tmp_path: Path) -> None:
    """CLI import at TP=2 keeps the vision tower beside the Megatron checkpoint; export at
    PP=2 writes it back: bit-exact, and HF's logits match the checkpoint's."""
    from bridgegen.cli.main import main

    folder, _ = make_multimodal(tmp_path / "hf", tied=False)
    checkpoint, out = tmp_path / "ckpt", tmp_path / "out"
    assert main(["import", "--hf", str(folder), "--out", str(checkpoint), "--tp", "2"]) == 0
    assert main(["export", "--megatron", str(checkpoint), "--out", str(out), "--pp", "2"]) == 0
    assert_bit_exact(folder, out)
    assert (
        main(["verify", "--hf", str(out), "--megatron", str(checkpoint), "--tp", "2", "--seq-len", "24"]) == 0
    )
