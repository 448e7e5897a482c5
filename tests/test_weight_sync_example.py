"""The weight-sync example (examples/weight_sync_rl.py) run as a user runs it, and weight sync of
a model built and wrapped as Megatron-LM builds it (not by bridgegen's builder)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bridgegen.engines.launch import run_on_ranks

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "weight_sync_rl.py"


@pytest.mark.slow
def test_weight_sync_rl_example_runs_to_parity() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("weight sync parity:")]
    assert len(lines) == 1, done.stdout[-3000:]
    assert re.match(
        r"weight sync parity: OK -- trainer TP=2 x PP=2 \(4 gloo ranks\) -> receiver \(rank 4\): 39 HF tensors, .*"
        r"receiver logits torch\.equal HF source logits \(fp32\): True \(max\|diff\| 0\.0e\+00, "
        r"before sync differed: True, missing: 0\)",
        lines[0],
    ), lines[0]


# ------------------------------------------------------------------ a Megatron-LM-built model

TP = 2
VOCAB = 250  # Megatron-LM pads it to 256: a multiple of make_vocab_size_divisible_by (128) x TP
VOCAB_MULTIPLE = 128 * TP


def megatron_lm_model(bridge: Any) -> torch.nn.Module:
    """Megatron-LM's ``model_provider`` (pretrain_gpt.py, local spec) and ``get_model`` for a
    --bf16 run, on CPU: GPTModel from megatron-core's local layer spec, randomly initialised
    (--use-cpu-initialization), default tensor-parallel attributes set on every parameter, then
    wrapped in Float16Module and megatron-core's DistributedDataParallel."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.enums import ModelType
    from megatron.core.transformer.module import Float16Module

    from bridgegen.megatron.build import transformer_config_for
    from bridgegen.megatron.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    # The TransformerConfig that Megatron-LM's arguments for this Llama make (core_transformer_config_from_args).
    config = transformer_config_for(bridge, torch.bfloat16, tensor_parallel_size=TP)
    config.perform_initialization = True  # Megatron-LM initialises; the load must overwrite every value
    assert config.bf16 and config.normalization == "RMSNorm"
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    values = bridge.config.values
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=bridge.config.padded_vocab_size(),
        max_sequence_length=int(values["max_sequence_length"]),
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(values.get("rotary_base", 10000)),
    )
    model.model_type = ModelType.encoder_or_decoder
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    wrapped = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=wrapped)


def megatron_lm_sync(folder: str) -> dict[str, Any]:
    """One rank of TP=2: build as Megatron-LM does, load_weights from the HF folder, export."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.weight_load import load_weights
    from bridgegen.engines.weight_sync import WeightExport, unwrap

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    bridge = ModelBridge.from_hf_dir(folder).with_vocab_multiple(VOCAB_MULTIPLE)
    model = megatron_lm_model(bridge)
    inner = unwrap(model)
    before = {name: tensor.clone() for name, tensor in inner.state_dict().items() if tensor is not None}
    load_weights(bridge, [model], folder)
    after = inner.state_dict()
    source = load_file(str(Path(folder) / "model.safetensors"))
    yielded = list(WeightExport(bridge, [model])())
    names = [name for name, _ in yielded]
    return {
        "rank": dist.get_rank(),
        "wrapped_names": next(iter(dict(model.named_parameters()))).startswith("module.module."),
        "vocab_rows": int(inner.embedding.word_embeddings.weight.shape[0]) * TP,
        "unchanged": sorted(
            name
            for name, tensor in before.items()
            if "_extra_state" not in name
            and torch.is_floating_point(tensor)
            and tensor.numel() > 1
            and torch.equal(tensor, after[name])
        ),
        "unequal": [
            name
            for name, tensor in yielded
            if name not in source
            or tensor.dtype != source[name].dtype
            or not torch.equal(tensor, source[name])
        ],
        "missing": sorted(set(source) - set(names)),
        "repeated": len(names) - len(set(names)),
    }


@pytest.mark.slow
def test_megatron_lm_built_model_syncs_bit_exact(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    results = run_on_ranks(megatron_lm_sync, TP, str(tmp_path))
    for result in results:
        assert result["wrapped_names"], result
        assert result["vocab_rows"] == 256, result
        # Every random initial value is overwritten (norm weights start at ones, as HF's do).
        assert all("layernorm" in name or "final_norm" in name for name in result["unchanged"]), result
        assert result["unequal"] == [] and result["missing"] == [] and result["repeated"] == 0, result
