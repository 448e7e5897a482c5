"""HF <-> Megatron weight conversion on tiny random models of every dense family.

One tiny HF model is built per (family, tied, dtype) variant, saved with ``save_pretrained``,
imported into a megatron-core GPTModel and exported again. Models, imports and exports are
cached for the module, so megatron-core is imported once and each variant is converted once.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

VOCAB = 250  # not divisible by 128: padded to a multiple of 128 it becomes 256
SEQ = 16
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
LOGIT_ATOL = 1e-5

# Shrunk versions of the real configs' field sets (Llama-3.2, Qwen2-7B, Qwen3-0.6B, Mistral-7B, Phi-3).
FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False, mlp_bias=False),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=131072),
    "qwen3": dict(head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False),
    "mistral": dict(rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096),
    # Phi-3 fuses q/k/v and gate/up on the HF side; window 5 < SEQ so the window matters.
    "phi3": dict(
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=5,
        original_max_position_embeddings=256,
        pad_token_id=0,
    ),
}


@dataclass(frozen=True)
class Variant:
    family: str
    tied: bool = False
    dtype: torch.dtype = torch.float32
    sliding_window: int | None = None  # mistral only; overrides FAMILY_KWARGS
    max_shard_size: str | None = None

    @property
    def name(self) -> str:
        parts = [self.family, "tied" if self.tied else "untied", str(self.dtype).removeprefix("torch.")]
        if self.sliding_window is not None:
            parts.append(f"window{self.sliding_window}")
        if self.max_shard_size:
            parts.append(f"shards{self.max_shard_size}")
        return "-".join(parts)


@dataclass
class Converted:
    variant: Variant
    hf_dir: Path
    hf_model: Any  # the fp32 transformers model the checkpoint was saved from (eval mode)
    bridge: Any
    model: Any
    stats: Any
    exports: dict[str, Path] = field(default_factory=dict)


def hf_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(FAMILY_KWARGS[family])
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere: norms around 1, biases non-zero, weights std 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


def token_ids(seed: int = 0, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megatron_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from bridgegen.megatron.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    model.eval()
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        logits = model(ids, positions, attention_mask=None)
    assert logits.shape[-1] == 256, "the vocab is padded to a multiple of 128"
    return logits[..., :VOCAB].float()


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def parity(megatron: torch.Tensor, hf: torch.Tensor) -> tuple[float, float, float]:
    diff = (megatron - hf).abs()
    agree = (megatron.argmax(-1) == hf.argmax(-1)).float().mean().item()
    return diff.max().item(), diff.mean().item(), agree


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        part = load_file(str(path))
        assert not set(part) & set(out), f"{path}: tensor stored twice"
        out.update(part)
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def assert_param_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter has ``dtype``, except that megatron-core's local (non-TE) RMSNorm
    (WrappedTorchNorm -> torch.nn.RMSNorm) allocates its weight in float32 whatever the
    params_dtype; float32 holds a bf16 value exactly, so conversion stays bit-exact."""
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            assert param.dtype in (dtype, torch.float32), name
        else:
            assert param.dtype == dtype, name


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def convert(workspace: Path) -> Any:
    """``convert(variant)``: the HF checkpoint, saved, and its Megatron import (cached)."""
    from transformers import AutoModelForCausalLM

    from bridgegen.engines.model import ModelBridge

    cache: dict[Variant, Converted] = {}

    def get(variant: Variant) -> Converted:
        if variant in cache:
            return cache[variant]
        overrides: dict[str, Any] = {"tie_word_embeddings": variant.tied}
        if variant.sliding_window is not None:
            overrides["sliding_window"] = variant.sliding_window
        config = hf_config(variant.family, **overrides)
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(hf_model, seed=len(cache) + 1)
        hf_model.eval()
        hf_dir = workspace / variant.name / "hf"
        saved = hf_model if variant.dtype == torch.float32 else _copy_to(hf_model, variant.dtype)
        kwargs = {"max_shard_size": variant.max_shard_size} if variant.max_shard_size else {}
        saved.save_pretrained(str(hf_dir), **kwargs)
        # Padded as Megatron-LM pads (128 rows at TP=1), so every test here runs padded rows.
        bridge = ModelBridge.from_hf_dir(hf_dir).with_vocab_multiple(128)
        model = bridge.build_model()
        stats = bridge.load_hf_weights(model)
        cache[variant] = Converted(variant, hf_dir, hf_model, bridge, model, stats)
        return cache[variant]

    return get


def _copy_to(model: Any, dtype: torch.dtype) -> Any:
    import copy

    return copy.deepcopy(model).to(dtype)


def export(converted: Converted, tag: str = "out", **kwargs: Any) -> Path:
    if tag not in converted.exports:
        out = converted.hf_dir.parent / tag
        converted.bridge.export_hf(converted.model, out, **kwargs)
        converted.exports[tag] = out
    return converted.exports[tag]


VARIANTS = [Variant(f, tied) for f in FAMILIES for tied in (False, True)]
ROUNDTRIP_VARIANTS = [
    Variant(f, tied, dtype)
    for f in FAMILIES
    for tied in (False, True)
    for dtype in (torch.float32, torch.bfloat16)
]


def _ids(variants: list[Variant]) -> list[str]:
    return [v.name for v in variants]


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("variant", ROUNDTRIP_VARIANTS, ids=_ids(ROUNDTRIP_VARIANTS))
def test_roundtrip_is_bit_exact(convert: Any, variant: Variant) -> None:
    converted = convert(variant)
    # The Megatron model takes the checkpoint's dtype when none is asked for.
    assert converted.model.config.params_dtype == variant.dtype
    assert_param_dtypes(converted.model, variant.dtype)
    source = all_tensors(converted.hf_dir)
    assert converted.stats.hf_tensors_used == len(source)
    out = export(converted)
    exported = all_tensors(out)
    assert_same_tensors(exported, source)
    assert ("lm_head.weight" in exported) is not variant.tied
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is variant.tied
    assert config.get("torch_dtype", config.get("dtype")) == str(variant.dtype).removeprefix("torch.")


def test_megatron_vocab_is_padded_with_zero_rows(convert: Any) -> None:
    converted = convert(Variant("llama"))
    params = dict(converted.model.named_parameters())
    source = all_tensors(converted.hf_dir)
    for megatron_name, hf_name in (
        ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ):
        param = params[megatron_name]
        assert tuple(param.shape) == (256, 64)
        assert torch.equal(param[:VOCAB], source[hf_name])
        assert torch.count_nonzero(param[VOCAB:]) == 0


def test_tied_megatron_model_has_no_output_layer_weight(convert: Any) -> None:
    converted = convert(Variant("qwen3", tied=True))
    names = {n for n, _ in converted.model.named_parameters()}
    assert "output_layer.weight" not in names
    assert "embedding.word_embeddings.weight" in names


def test_tied_checkpoint_that_still_holds_lm_head_loads(convert: Any, workspace: Path) -> None:
    """Some tied checkpoints keep a copy of lm_head.weight; it is ignored, not an error."""
    converted = convert(Variant("llama", tied=True))
    folder = workspace / "tied-with-lm-head"
    shutil.copytree(converted.hf_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = converted.bridge.build_model()
    converted.bridge.load_hf_weights(model, folder)
    ids = token_ids(3)
    assert torch.equal(megatron_logits(model, ids), megatron_logits(converted.model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_to_other_dtype(convert: Any, family: str) -> None:
    converted = convert(Variant(family))
    out = export(converted, "out-bf16", dtype="bf16")
    source = all_tensors(converted.hf_dir)
    assert_same_tensors(all_tensors(out), {k: v.to(torch.bfloat16) for k, v in source.items()})
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


DTYPE_KEY_BUG = (
    "export_hf sets config['torch_dtype'] to the export dtype but keeps the source's "
    "transformers>=4.56 'dtype' key from hf_passthrough, which transformers reads first: an fp32 "
    "source exported as bf16 says dtype=float32 (bridgegen/runtime/convert.py, export_hf)"
)


def test_exported_config_dtype_matches_the_tensors(convert: Any) -> None:
    from transformers import AutoConfig

    converted = convert(Variant("llama"))
    out = export(converted, "out-bf16", dtype="bf16")
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16


def test_build_model_with_explicit_dtype(convert: Any) -> None:
    converted = convert(Variant("mistral", dtype=torch.bfloat16))
    model = converted.bridge.build_model(dtype="fp32")
    assert_param_dtypes(model, torch.float32)
    converted.bridge.load_hf_weights(model)
    source = all_tensors(converted.hf_dir)
    got = dict(converted.bridge.iter_hf_weights(model))
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in got.items()}, source)
    assert {v.dtype for v in got.values()} == {torch.float32}


# ---------------------------------------------------------------- logits parity


# Untied: each family's example config, run by tests/test_families.py.
TIED_VARIANTS = [v for v in VARIANTS if v.tied]


@pytest.mark.parametrize("variant", TIED_VARIANTS, ids=_ids(TIED_VARIANTS))
def test_logits_parity_fp32(convert: Any, variant: Variant) -> None:
    converted = convert(variant)
    ids = token_ids(1)
    megatron = megatron_logits(converted.model, ids)
    hf = hf_logits(converted.hf_model, ids)
    max_diff, mean_diff, agree = parity(megatron, hf)
    print(
        f"\n{variant.name}: max|diff|={max_diff:.3e} mean|diff|={mean_diff:.3e} argmax agreement={agree:.2%}"
    )
    assert hf.abs().max() > 0.5, "logits this small would make the comparison vacuous"
    assert max_diff <= LOGIT_ATOL
    assert agree == 1.0


def test_mistral_sliding_window_shorter_than_sequence(convert: Any) -> None:
    converted = convert(Variant("mistral", sliding_window=4))
    assert converted.bridge.config.values["window_size"] == [3, 0]
    ids = token_ids(2, seq=SEQ)
    megatron = megatron_logits(converted.model, ids)
    hf = hf_logits(converted.hf_model, ids)
    max_diff, mean_diff, agree = parity(megatron, hf)
    print(
        f"\nmistral window 4, seq {SEQ}: max|diff|={max_diff:.3e} mean|diff|={mean_diff:.3e} argmax={agree:.2%}"
    )
    # The window matters: without it the same weights give other logits after position 4.
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_config(hf_config("mistral", sliding_window=None), dtype=torch.float32)
    full.load_state_dict(converted.hf_model.state_dict())
    unwindowed = hf_logits(full, ids)
    assert torch.allclose(unwindowed[:, :4], hf[:, :4], atol=1e-5)
    assert (unwindowed[:, 4:] - hf[:, 4:]).abs().max() > 1e-2
    assert max_diff <= LOGIT_ATOL
    assert agree == 1.0
    # and the window survives the round trip
    out = export(converted)
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4


# ---------------------------------------------------------------- sharded checkpoints


def test_sharded_source_and_sharded_export(convert: Any) -> None:
    from transformers import AutoModelForCausalLM

    from bridgegen.formats.safetensors import Checkpoint

    converted = convert(Variant("qwen2", max_shard_size="100KB"))
    source_index = json.loads((converted.hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(source_index["weight_map"].values())) > 1
    assert not (converted.hf_dir / "model.safetensors").exists()
    source = all_tensors(converted.hf_dir)
    ids = token_ids(4)
    max_diff, _, agree = parity(megatron_logits(converted.model, ids), hf_logits(converted.hf_model, ids))
    assert max_diff <= LOGIT_ATOL and agree == 1.0

    limit = 100_000
    out = export(converted, "out-sharded", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    count = len(files)
    assert count > 1
    assert files == [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert sorted(index["weight_map"]) == sorted(source)
    total = 0
    for name in files:
        part = load_file(str(out / name))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1, f"{name}: {size} bytes over the {limit} limit"
        assert all(index["weight_map"][t] == name for t in part)
        total += size
    assert index["metadata"]["total_size"] == total
    assert_same_tensors(all_tensors(out), source)
    assert sorted(Checkpoint.open(out).names()) == sorted(source)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(converted.hf_model, ids))


# ---------------------------------------------------------------- transformers can load the export

# Fields whose value is allowed to differ: bookkeeping of the writer, not the model.
VOLATILE = {"_name_or_path", "transformers_version"}


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids(VARIANTS))
def test_export_loads_in_transformers(convert: Any, variant: Variant) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    converted = convert(variant)
    out = export(converted)
    source_config = AutoConfig.from_pretrained(converted.hf_dir).to_dict()
    exported_config = AutoConfig.from_pretrained(out).to_dict()
    for key in VOLATILE:
        source_config.pop(key, None)
        exported_config.pop(key, None)
    # Qwen2Config has no head_dim field; the export writes the derived value, which
    # Qwen2Attention reads with getattr(config, "head_dim", hidden_size // heads): harmless.
    if "head_dim" not in source_config:
        assert (
            exported_config.pop("head_dim")
            == source_config["hidden_size"] // source_config["num_attention_heads"]
        )
    # transformers 5 keeps Phi-3's partial_rotary_factor inside rope_parameters; the export
    # writes it top-level (the classic shape), which Phi3Config reads back to the same value.
    if "partial_rotary_factor" in exported_config and "partial_rotary_factor" not in source_config:
        assert exported_config.pop("partial_rotary_factor") == source_config["rope_parameters"].get(
            "partial_rotary_factor", 1.0
        )
    assert exported_config == source_config
    assert (out / "generation_config.json").read_bytes() == (
        converted.hf_dir / "generation_config.json"
    ).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded) is type(converted.hf_model)
    ids = token_ids(5)
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(converted.hf_model, ids))


# ---------------------------------------------------------------- in-process streaming


@pytest.mark.parametrize(
    "variant",
    [*VARIANTS, Variant("qwen3", dtype=torch.bfloat16)],
    ids=_ids([*VARIANTS, Variant("qwen3", dtype=torch.bfloat16)]),
)
def test_iter_hf_weights_yields_the_source_tensors(convert: Any, variant: Variant) -> None:
    converted = convert(variant)
    pairs = list(converted.bridge.iter_hf_weights(converted.model))
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), "a tensor is yielded twice"
    assert_same_tensors(dict(pairs), all_tensors(converted.hf_dir))
