"""`make demo`: a full conversion of a tiny random Llama, offline, with a short report.

Builds a Llama-3.1-shaped model (llama3 RoPE scaling, GQA) from a config, saves it as an HF
folder, imports it into a Megatron-Core dist checkpoint, checks logits against HF, exports it
back to HF and checks every tensor is bit-exact.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

OUT = Path("demo_out")


def main() -> int:
    from bridgegen.engines.progress import quiet_third_party, transformers_bars_hidden

    quiet_third_party()  # this process is ours: BRIDGEGEN_SHOW_WARNINGS=1 shows their notices
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridgegen.engines.checkpoint import load_megatron, save_megatron
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.verify import hf_vs_megatron

    shutil.rmtree(OUT, ignore_errors=True)
    hf_dir, megatron_dir, export_dir = OUT / "hf", OUT / "megatron", OUT / "hf_export"
    config = AutoConfig.for_model(
        "llama",
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,  # not a multiple of 128: exercises vocab padding
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    auto: Any = AutoModelForCausalLM
    with transformers_bars_hidden():
        auto.from_config(config).save_pretrained(hf_dir)
    steps: list[tuple[str, str]] = []

    start = time.perf_counter()
    bridge = ModelBridge.from_hf_dir(hf_dir)
    model = bridge.build_model(torch.float32)
    stats = bridge.load_hf_weights(model)
    save_megatron(model, bridge, megatron_dir, dtype=torch.float32, hf_source=hf_dir)
    steps.append(("import HF -> Megatron", f"{stats.tensors} tensors, {time.perf_counter() - start:.1f} s"))

    parity = hf_vs_megatron(str(hf_dir), model, bridge.config.vocab_size, seq_len=64)
    steps.append(("logits HF vs Megatron (fp32)", str(parity)))

    start = time.perf_counter()
    reloaded = bridge.build_model(torch.float32)
    load_megatron(reloaded, megatron_dir)
    bridge.export_hf(reloaded, export_dir)
    steps.append(("export Megatron -> HF", f"{time.perf_counter() - start:.1f} s"))

    source = load_file(hf_dir / "model.safetensors")
    exported = load_file(export_dir / "model.safetensors")
    exact = source.keys() == exported.keys() and all(
        torch.equal(source[k], exported[k]) and source[k].dtype == exported[k].dtype for k in source
    )
    steps.append(("round trip HF -> Megatron -> HF", f"{len(source)} tensors, bit-exact: {exact}"))

    print(f"\nbridgegen demo: {bridge.bridge.__name__} on a tiny Llama-3.1-shaped model ({OUT}/)")
    for name, result in steps:
        print(f"  {name:<34} {result}")
    ok = exact and parity.ok(1e-5)
    print("  result:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
