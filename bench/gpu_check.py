"""GPU path check (run by bench/gpu_check.sh under torchrun, NCCL): the same conversion on
CUDA as on CPU. Not a test: it needs a GPU, which CI machines do not have.

Checks, on a tiny random Llama built offline:
  1. fp32 Megatron logits on GPU (TP=1, NCCL) vs HF fp32 logits on CPU: max|diff| <= 1e-4
     (TF32 off), argmax agreement 100%;
  2. the same against HF on the GPU;
  3. bf16: HF -> Megatron (GPU) -> HF is bit-exact, and bf16 logits agree with HF's bf16
     argmax on >= 95% of tokens;
  4. the Megatron-LM checkpoint layout saved from the GPU model (tracker -> release/, args in
     the common state), read back into a fresh GPU model and exported: bit-exact.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def tiny_llama(folder: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / "config.json").exists():
        config = AutoConfig.for_model(
            "llama",
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=1024,
            rope_theta=500000.0,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder)
    return folder


def megatron_logits(hf_dir: Path, dtype: torch.dtype, device: str, tokens: torch.Tensor) -> torch.Tensor:
    from bridgegen.engines.distributed import ParallelLayout, build_chunks, forward_logits, load_hf
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_dir(hf_dir)
    chunks = build_chunks(bridge, ParallelLayout(), dtype, parallel_output=False, device=device)
    load_hf(bridge, chunks, hf_dir)
    logits = forward_logits(chunks, tokens.to(device), bridge.config.vocab_size)
    assert logits is not None
    return logits.float().cpu()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="bench/out/gpu_check")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu to dry-run the script")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.workdir)
    fp32_dir, bf16_dir = (
        tiny_llama(work / "hf_fp32", torch.float32),
        tiny_llama(work / "hf_bf16", torch.bfloat16),
    )
    tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    results: list[tuple[str, bool, str]] = []

    from transformers import AutoModelForCausalLM

    from bridgegen.engines.verify import compare

    gpu = megatron_logits(fp32_dir, torch.float32, args.device, tokens)
    hf = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
    hf.train(False)
    with torch.no_grad():
        on_cpu = hf(tokens).logits.float()
        hf = hf.to(args.device)
        on_device = hf(tokens.to(args.device)).logits.float().cpu()
    parity = compare(on_cpu, gpu)
    results.append(("fp32 Megatron on GPU vs HF on CPU (TP=1)", parity.ok(1e-4), str(parity)))
    parity = compare(on_device, gpu)
    results.append(("fp32 Megatron on GPU vs HF on GPU", parity.ok(1e-4), str(parity)))

    from safetensors.torch import load_file

    from bridgegen.engines.distributed import ParallelLayout, build_chunks, export_hf, forward_logits, load_hf
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_dir(bf16_dir)
    chunks = build_chunks(bridge, ParallelLayout(), torch.bfloat16, parallel_output=False, device=args.device)
    load_hf(bridge, chunks, bf16_dir)
    out = work / "bf16_export"
    shutil.rmtree(out, ignore_errors=True)
    export_hf(bridge, chunks, out)
    a, b = load_file(bf16_dir / "model.safetensors"), load_file(out / "model.safetensors")
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    results.append(("bf16 HF -> Megatron (GPU) -> HF bit-exact", exact, f"{len(a)} tensors"))
    logits = forward_logits(chunks, tokens.to(args.device), 1000)
    assert logits is not None
    hf16 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).to(args.device)
    hf16.train(False)
    with torch.no_grad():
        reference16 = hf16(tokens.to(args.device)).logits.float().cpu()
    parity = compare(reference16, logits.float().cpu())
    results.append(("bf16 GPU vs HF bf16 (argmax >= 95%)", parity.argmax_agreement >= 0.95, str(parity)))

    from bridgegen.engines.checkpoint import load_megatron, save_megatron
    from bridgegen.engines.model import bridge_for_checkpoint
    from bridgegen.formats import dist_checkpoint, megatron_lm

    checkpoint = work / "bf16_megatron"
    shutil.rmtree(checkpoint, ignore_errors=True)
    save_megatron([c.model for c in chunks], bridge, checkpoint, dtype=torch.bfloat16, hf_source=bf16_dir)
    reread, saved_dtype = bridge_for_checkpoint(checkpoint)
    fresh = build_chunks(reread, ParallelLayout(), saved_dtype, parallel_output=False, device=args.device)
    load_megatron([c.model for c in fresh], checkpoint)
    out = work / "bf16_export_from_checkpoint"
    shutil.rmtree(out, ignore_errors=True)
    export_hf(reread, fresh, out)
    b = load_file(out / "model.safetensors")
    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    tracker = (checkpoint / megatron_lm.TRACKER_FILE).read_text()
    args_saved = dist_checkpoint.read_common_state(checkpoint / "release")["args"]
    layout_ok = tracker == "release" and args_saved.num_layers == 4 and saved_dtype == torch.bfloat16
    results.append(
        (
            "bf16 GPU model -> Megatron-LM checkpoint -> GPU model -> HF bit-exact",
            exact and layout_ok,
            f"tracker {tracker!r}, args.num_layers {args_saved.num_layers}, {len(b)} tensors",
        ),
    )

    if dist.get_rank() == 0:
        import megatron.core

        print(f"megatron-core {megatron.core.__version__}, torch {torch.__version__}")
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"device: {device_name}, backend: {dist.get_backend()}")
        for name, ok, detail in results:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
