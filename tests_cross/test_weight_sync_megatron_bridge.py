"""Weight sync of a model that Megatron-Bridge 0.6.2 builds.

An RL framework built on Megatron-Bridge builds its model with Megatron-Bridge's provider
(``AutoBridge.from_hf_pretrained(...).to_megatron_provider()``, then
``provide_distributed_model``) and fills it with ``load_hf_weights``; bridgegen's
``WeightExport`` must sync that model, not only one bridgegen built. Here: a small Qwen3-MoE
(every layer MoE) on 2 gloo ranks at TP=2 (expert-TP 2) and at EP=2, and in one process at
TP=1; each sync must give every HF tensor bit-exact, the same as the single-process export and
as the HF source.

Runs in the newest-versions environment, where ``make venv-latest`` installs megatron-bridge
0.6.2 next to megatron-core 0.19.2 and transformers 5.24, without its other dependencies::

    .venv-latest/bin/pip install --no-deps megatron-bridge==0.6.2 omegaconf==2.4.0 einops

(omegaconf 2.4 carries its own antlr4 runtime; 2.3 would also need antlr4-python3-runtime==4.9.3.)
Megatron-Bridge runs on CPU with the stand-ins of tests/data/megatron_checkpoints/make/cpu_compat.py
(transformer_engine dummy for its LoRA module, CPU device for torch.cuda calls, local layer
spec, fp32, no fusions). With transformers >= 5.13 (5.24 here), whose
``transformers.modeling_attn_mask_utils`` is gone, importing ``megatron.bridge`` fails in a
module of a model unrelated to this test (megatron/bridge/models/bailing/modeling_bailing_moe_v2.py,
imported by megatron/bridge/__init__.py); ``_megatron_bridge_shims`` gives it a module holding
the four names it imports, which this test never calls.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from bridgegen.engines.launch import run_on_ranks

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "tests" / "data" / "megatron_checkpoints" / "make"
LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2)}  # name -> (tensor parallel, expert parallel); expert-TP = TP
ATTENTION_MASK_NAMES = (
    "AttentionMaskConverter",
    "_prepare_4d_attention_mask",
    "_prepare_4d_causal_attention_mask",
    "_prepare_4d_causal_attention_mask_for_sdpa",
)


def make_qwen3_moe(folder: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # norms not all ones: a wrong mapping shows
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------ what each rank runs


def _megatron_bridge_shims() -> None:
    """Megatron-Bridge 0.6.2 on CPU in this environment (see the module docstring)."""
    sys.path.insert(0, str(MAKE))
    import cpu_compat  # installs te_stub

    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401 - transformers <= 5.12
    except ModuleNotFoundError:
        stub = types.ModuleType("transformers.modeling_attn_mask_utils")
        for name in ATTENTION_MASK_NAMES:
            setattr(stub, name, None)
        sys.modules[stub.__name__] = stub
    cpu_compat.cpu_patches()


def _build_with_megatron_bridge(folder: str, tp: int, ep: int) -> list[torch.nn.Module]:
    """Megatron-Bridge's provider and loader, the calls of AutoBridge.import_ckpt (CPU setup)."""
    import cpu_compat
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    cpu_compat.init_dist(tp=tp, ep=ep)  # the process group is run_on_ranks'; model-parallel groups here
    bridge = AutoBridge.from_hf_pretrained(folder)
    provider = bridge.to_megatron_provider(load_weights=False)
    cpu_compat.make_cpu_provider(provider, tp=tp)
    provider.expert_model_parallel_size = ep
    provider.expert_tensor_parallel_size = tp  # as megatron-core's parallel state has it
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, fp16=False, bf16=False, mixed_precision_wrapper=None
    )
    bridge.load_hf_weights(model)
    return model


def _synced(folder: str, models: list[torch.nn.Module]) -> dict[str, Any]:
    import torch.distributed as dist

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.weight_sync import WeightExport

    export = WeightExport(ModelBridge.from_hf_dir(folder), models)
    yielded = [(name, tensor.clone()) for name, tensor in export()]
    to_rank_0 = [name for name, _ in export(destinations={0})]
    return {
        "rank": dist.get_rank(),
        "names": [name for name, _ in yielded],
        "tensors": dict(yielded),
        "as_manifest": [(n, t.shape, t.dtype) for n, t in yielded] == export.manifest(),
        "to_rank_0": len(to_rank_0),
        "built": type(models[0]).__module__ + "." + type(models[0]).__name__,
    }


def single_process_sync(folder: str) -> dict[str, Any]:
    _megatron_bridge_shims()
    return _synced(folder, _build_with_megatron_bridge(folder, 1, 1))


def every_layout_sync(folder: str) -> dict[str, Any]:
    _megatron_bridge_shims()
    out = {}
    for name, (tp, ep) in LAYOUTS.items():
        result = _synced(folder, _build_with_megatron_bridge(folder, tp, ep))
        if result["rank"] != 0:
            result["tensors"] = {
                n: t for n, t in result["tensors"].items() if "experts" not in n
            }  # less to pickle
        out[name] = result
    return out


# ------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = make_qwen3_moe(tmp_path_factory.mktemp("mb_provider") / "hf")
    (single,) = run_on_ranks(single_process_sync, 1, folder)
    ranks = run_on_ranks(every_layout_sync, 2, folder)
    return {"folder": folder, "single": single, "ranks": ranks}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_megatron_bridge_built_model_syncs_bit_exact(layout: str, synced: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    source: dict[str, torch.Tensor] = {}
    for file in sorted(Path(synced["folder"]).glob("*.safetensors")):
        source.update(load_file(file))
    single = synced["single"]
    assert single["built"] == "megatron.core.models.gpt.gpt_model.GPTModel"
    assert sorted(single["names"]) == sorted(source)
    assert all(torch.equal(single["tensors"][n], source[n]) for n in source), (
        "single-process export vs HF source"
    )
    for ranks in synced["ranks"]:
        result = ranks[layout]
        assert result["names"] == single["names"], result["rank"]  # the same tensors in the same order
        assert result["as_manifest"]
        unequal = [
            n
            for n, t in result["tensors"].items()
            if t.dtype != single["tensors"][n].dtype or not torch.equal(t, single["tensors"][n])
        ]
        assert unequal == [], (layout, result["rank"], unequal[:5])
        assert result["to_rank_0"] == (len(source) if result["rank"] == 0 else 0)
