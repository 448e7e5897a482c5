"""Conversion throughput and memory against raw safetensors I/O of the same tensors.

Builds a synthetic bf16 checkpoint with Llama-3.2-1B's shapes (random weights, offline),
then runs each phase in a fresh process, several times, and reports median wall time and
the phase's peak RSS above the process's RSS just before the phase started:

  raw-read   every safetensors file read whole into memory (readinto)
  import     bridgegen: HF folder -> megatron-core GPTModel (built without init)
  raw-write  the same bytes written back as plain files, fsynced
  export     bridgegen: GPTModel -> HF folder
  import-tp2 bridgegen at TP=2 on 2 local processes (gloo): each rank reads only its slices
  export-tp2 bridgegen at TP=2: gather over TP onto rank 0, which streams the shards

End to end (what `bridgegen import` / `export` do), each against the raw read + raw write
timed just before it:

  stream-import  HF folder -> Megatron checkpoint, no model built (the default)
  stream-import-w2  the same on 2 local worker processes (--workers 2), timed inside the workers
  model-import   the same through a model: build, load, megatron-core's save
  stream-export  Megatron checkpoint -> HF folder, no model built (the default)
  stream-export-w2  the same on 2 local worker processes (--workers 2), timed inside the workers
  model-export   the same through a model: build, megatron-core's load, export

Usage: python bench/bench_convert.py [--repeats 3] [--workdir bench/out]
This is a benchmark, not a test: numbers depend on the machine and its page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec from the
    forked parent, so a phase started by a parent that had just built the checkpoint reported
    the parent's ~2.2 GB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def make_checkpoint(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    c = LLAMA_32_1B
    h, f, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    generator = torch.Generator().manual_seed(0)
    names = sorted(shapes)
    shards = [names[i::3] for i in range(3)]  # three shards, as the published checkpoint layout varies
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-00003.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in shard}
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(LLAMA_32_1B, indent=2))


OUTPUTS = {
    "stream-import": "megatron-stream",
    "stream-import-w2": "megatron-stream",
    "model-import": "megatron-model",
    "stream-export": "hf-stream",
    "stream-export-w2": "hf-stream",
    "model-export": "hf-model",
}


def start_cold(name: str, scratch: Path) -> None:
    """Every phase starts from the same state: the phase's old output removed, earlier writes
    on disk, and (when allowed, i.e. as root) the page cache emptied, so reads come from the
    disk and writes do not wait for the kernel to reclaim a full cache. Without that the same
    2.4 GB write measured anywhere from 0.7 s to 6 s on this machine."""
    if name in OUTPUTS:
        shutil.rmtree(scratch / OUTPUTS[name], ignore_errors=True)
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass


def phase(name: str, checkpoint: Path, scratch: Path) -> dict[str, float]:
    """Run one phase in this process; returns seconds and peak RSS above the start."""
    import torch

    from bridgegen.engines.model import ModelBridge

    start_cold(name, scratch)
    result: dict[str, float] = {}
    if name in END_TO_END:
        return end_to_end(name, checkpoint, scratch)
    if name in ("raw-read", "raw-write"):
        # The plainest I/O of the same bytes: each safetensors file read whole into memory
        # (readinto, no mapping, no parsing), then written back as plain files and fsynced.
        before = rss_bytes()
        start = time.perf_counter()
        contents = {}
        for file in sorted(checkpoint.glob("*.safetensors")):
            buffer = torch.empty(file.stat().st_size, dtype=torch.uint8)
            view = memoryview(buffer.numpy())
            with file.open("rb", buffering=0) as handle:
                done = 0
                while done < len(view):
                    done += handle.readinto(view[done:]) or 0
            contents[file.name] = buffer
        result["read_s"] = time.perf_counter() - start
        if name == "raw-write":
            raw = scratch / "raw-write"
            shutil.rmtree(raw, ignore_errors=True)
            raw.mkdir(parents=True)
            # The write starts with an empty page cache too: on this machine writing beside
            # 2.4 GB of just-read pages took 4-7 s against 1.8 s without them, a baseline slower
            # than the conversions it is meant to bound.
            start_cold(name, scratch)
            before = rss_bytes()
            start = time.perf_counter()
            for file_name, buffer in contents.items():
                with (raw / file_name).open("wb", buffering=0) as handle:
                    handle.write(memoryview(buffer.numpy()))
                    # On disk, as the conversions leave their files (torch's checkpoint writer
                    # and ours fsync them before they count as written).
                    os.fsync(handle.fileno())
            result["seconds"] = time.perf_counter() - start
        else:
            result["seconds"] = result["read_s"]
        result["bytes"] = float(sum(b.numel() for b in contents.values()))
    else:
        bridge = ModelBridge.from_hf_dir(checkpoint)
        start = time.perf_counter()
        model = bridge.build_model(torch.bfloat16)
        result["build_s"] = time.perf_counter() - start
        before = rss_bytes()
        start = time.perf_counter()
        stats = bridge.load_hf_weights(model)
        result["bytes"] = float(stats.bytes_requested)
        if name == "import":
            result["seconds"] = time.perf_counter() - start
        else:
            result["import_s"] = time.perf_counter() - start
            shutil.rmtree(scratch / "hf-export", ignore_errors=True)
            before = rss_bytes()
            start = time.perf_counter()
            bridge.export_hf(model, scratch / "hf-export", overwrite=True)
            result["seconds"] = time.perf_counter() - start
    result["rss_before_mb"] = before / 2**20
    result["peak_above_mb"] = (peak_rss_bytes() - before) / 2**20
    return result


END_TO_END = (
    "stream-import",
    "stream-import-w2",
    "model-import",
    "stream-export",
    "stream-export-w2",
    "model-export",
)


def stream_import_on_rank(checkpoint: Path, out: Path) -> tuple[float, float]:
    """One of two workers of a streaming import (run by run_on_ranks): its bytes and seconds,
    timed from a barrier after the imports, as for the one-process phase."""
    import megatron.core.models.gpt.gpt_model  # noqa: F401 - imported before the timer, as there
    import torch
    import torch.distributed as dist

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.stream_import import stream_import

    dist.barrier()
    start = time.perf_counter()
    bridge = ModelBridge.from_hf_dir(checkpoint)
    moved = stream_import(bridge, checkpoint, out, dtype=torch.bfloat16, overwrite=True).bytes_requested
    return float(moved), time.perf_counter() - start


def stream_export_on_rank(megatron_dir: Path, out: Path) -> tuple[float, float]:
    """One of two workers of a streaming export (run by run_on_ranks): its seconds, timed from
    a barrier after the imports."""
    import megatron.core.models.gpt.gpt_model  # noqa: F401 - imported before the timer, as there
    import torch.distributed as dist

    from bridgegen.engines.stream_export import stream_export

    dist.barrier()
    start = time.perf_counter()
    stream_export(megatron_dir, out, overwrite=True)
    return float(sum(p.stat().st_size for p in out.glob("*.safetensors"))), time.perf_counter() - start


def end_to_end(name: str, checkpoint: Path, scratch: Path) -> dict[str, float]:
    """One whole conversion, as the CLI runs it (torch and megatron-core already imported); in
    one process, transformers' config check runs beside the conversion, as there."""
    from bridgegen.bridge.config_checks import config_checks_alongside

    if name.endswith("-w2"):
        return _end_to_end(name, checkpoint, scratch)
    with config_checks_alongside():
        return _end_to_end(name, checkpoint, scratch)


def _end_to_end(name: str, checkpoint: Path, scratch: Path) -> dict[str, float]:
    import megatron.core.models.gpt.gpt_model  # noqa: F401 - imported before the timer
    import torch

    import bridgegen.engines.stream_import  # noqa: F401 - imports before the measured part
    from bridgegen.engines.checkpoint import load_megatron, save_megatron
    from bridgegen.engines.model import ModelBridge, bridge_for_checkpoint
    from bridgegen.engines.stream_export import stream_export
    from bridgegen.engines.stream_import import stream_import

    megatron_dir, hf_dir = scratch / f"megatron-{name.split('-')[0]}", scratch / f"hf-{name.split('-')[0]}"
    before = rss_bytes()
    start = time.perf_counter()
    if name == "stream-import":
        bridge = ModelBridge.from_hf_dir(checkpoint)
        stats = stream_import(bridge, checkpoint, megatron_dir, dtype=torch.bfloat16, overwrite=True)
        moved = float(stats.bytes_requested)
    elif name == "stream-import-w2":
        from bridgegen.engines.launch import run_on_ranks

        ranks = run_on_ranks(stream_import_on_rank, 2, checkpoint, megatron_dir)
        peak = (peak_rss_bytes() - before) / 2**20
        return {
            "seconds": max(r[1] for r in ranks),
            "bytes": sum(r[0] for r in ranks),
            "rss_before_mb": before / 2**20,
            "peak_above_mb": peak,
        }
    elif name == "stream-export-w2":
        from bridgegen.engines.launch import run_on_ranks

        ranks = run_on_ranks(stream_export_on_rank, 2, scratch / "megatron-stream", hf_dir)
        peak = (peak_rss_bytes() - before) / 2**20
        return {
            "seconds": max(r[1] for r in ranks),
            "bytes": ranks[0][0],
            "rss_before_mb": before / 2**20,
            "peak_above_mb": peak,
        }
    elif name == "model-import":
        bridge = ModelBridge.from_hf_dir(checkpoint)
        model = bridge.build_model(torch.bfloat16)
        moved = float(bridge.load_hf_weights(model).bytes_requested)
        save_megatron(model, bridge, megatron_dir, dtype=torch.bfloat16, hf_source=checkpoint, overwrite=True)
    elif name == "stream-export":
        stream_export(scratch / "megatron-stream", hf_dir, overwrite=True)
        moved = float(sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")))
    else:
        bridge, dtype = bridge_for_checkpoint(scratch / "megatron-stream")
        model = bridge.build_model(dtype)
        load_megatron(model, scratch / "megatron-stream")
        bridge.export_hf(model, hf_dir, overwrite=True)
        moved = float(sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")))
    seconds = time.perf_counter() - start
    peak = (peak_rss_bytes() - before) / 2**20
    return {"seconds": seconds, "bytes": moved, "rss_before_mb": before / 2**20, "peak_above_mb": peak}


def rank_phase(name: str, checkpoint: Path, scratch: Path) -> dict[str, float]:
    """One rank's part of a TP=2 phase (run by bridgegen.engines.launch.run_on_ranks)."""
    import torch
    import torch.distributed as dist

    from bridgegen.engines.distributed import ParallelLayout, build_chunks, export_hf, load_hf
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_dir(checkpoint)
    chunks = build_chunks(bridge, ParallelLayout(tp=2), torch.bfloat16)
    dist.barrier()
    before = rss_bytes()
    start = time.perf_counter()
    stats = load_hf(bridge, chunks, checkpoint)
    dist.barrier()
    result = {"bytes": float(stats.bytes_requested)}
    if name == "import-tp2":
        result["seconds"] = time.perf_counter() - start
    else:
        if dist.get_rank() == 0:
            shutil.rmtree(scratch / "hf-export-tp2", ignore_errors=True)
        dist.barrier()
        before = rss_bytes()
        start = time.perf_counter()
        export_hf(bridge, chunks, scratch / "hf-export-tp2")
        result["seconds"] = time.perf_counter() - start
    result["rss_before_mb"] = before / 2**20
    result["peak_above_mb"] = (peak_rss_bytes() - before) / 2**20
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="bench/out")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated phases to run (default: all)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    checkpoint, scratch = workdir / "llama-3.2-1b-synthetic", workdir / "scratch"
    if args.phase in ("import-tp2", "export-tp2"):
        from bridgegen.engines.launch import run_on_ranks

        ranks = run_on_ranks(rank_phase, 2, args.phase, checkpoint, scratch)
        print(
            json.dumps(
                {
                    "seconds": max(r["seconds"] for r in ranks),
                    "bytes": sum(r["bytes"] for r in ranks),
                    "rank_bytes": [r["bytes"] for r in ranks],
                    "peak_above_mb": max(r["peak_above_mb"] for r in ranks),
                    "rss_before_mb": max(r["rss_before_mb"] for r in ranks),
                }
            )
        )
        return 0
    if args.phase:
        print(json.dumps(phase(args.phase, checkpoint, scratch)))
        return 0
    make_checkpoint(checkpoint)
    model_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    runs: dict[str, list[dict[str, float]]] = {}
    phases = ("raw-read", "import", "raw-write", "export", "import-tp2", "export-tp2", *END_TO_END)
    chosen = [name for name in phases if not args.only or name in args.only.split(",")]
    if any(name.endswith(("export", "export-w2")) and name.startswith(("stream", "model")) for name in chosen):
        if not (scratch / "megatron-stream" / "latest_checkpointed_iteration.txt").exists():
            # The end-to-end exports read the streaming import's checkpoint: make it, untimed.
            subprocess.run(
                [sys.executable, __file__, "--phase", "stream-import", "--workdir", str(workdir)],
                capture_output=True,
                check=True,
            )

    def run(name: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--phase", name, "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            check=True,
        )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    # This machine's disk speed drifts during a run (the same write took 1.4 s to 7 s), so each
    # end-to-end phase is timed right after its own raw read + raw write, and its ratio is to
    # that pair.
    paired: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name in chosen:
            if name in END_TO_END:
                raw = run("raw-write")
                runs.setdefault(name, []).append(run(name))
                paired.setdefault(name, []).append(runs[name][-1]["seconds"] / (raw["read_s"] + raw["seconds"]))
                runs.setdefault("raw-io (paired)", []).append({**raw, "seconds": raw["read_s"] + raw["seconds"]})
            else:
                runs.setdefault(name, []).append(run(name))
    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    spread = {name: (min(r["seconds"] for r in rs), max(r["seconds"] for r in rs)) for name, rs in runs.items()}
    peak = {name: max(r["peak_above_mb"] for r in rs) for name, rs in runs.items()}
    base = {name: statistics.median(r["rss_before_mb"] for r in rs) for name, rs in runs.items()}
    print(
        f"checkpoint: {checkpoint} ({model_bytes / 1e9:.2f} GB bf16, 3 shards); medians of {args.repeats} runs "
        "(min-max); every phase starts with its output removed and, as root, an empty page cache"
    )

    def row(name: str, ratio: float) -> None:
        low, high = spread[name]
        print(
            f"{name:<17} {med[name]:>6.2f} ({low:.2f}-{high:.2f}) {ratio:>6.2f}x {peak[name]:>10.0f} MB "
            f"{base[name]:>10.0f} MB"
        )

    print(f"{'phase':<17} {'seconds':>18} {'ratio':>7} {'peak RSS above start':>14} {'RSS at start':>13}")
    for name, ref in (
        ("raw-read", "raw-read"),
        ("import", "raw-read"),
        ("import-tp2", "raw-read"),
        ("raw-write", "raw-write"),
        ("export", "raw-write"),
        ("export-tp2", "raw-write"),
    ):
        if name in med and ref in med:
            row(name, med[name] / med[ref])
    if paired:
        print(
            "end to end (megatron-core already imported); ratio = median of each run against the raw "
            "read + raw write timed just before it:"
        )
        row("raw-io (paired)", 1.0)
        for name in END_TO_END:
            if name in paired:
                row(name, statistics.median(paired[name]))
    if "import" in runs:
        print(f"import bytes requested / checkpoint bytes: {runs['import'][0]['bytes'] / model_bytes:.3f}")
        print(
            f"model bytes: {model_bytes / 2**20:.0f} MB; "
            f"import peak / model bytes: {peak['import'] / (model_bytes / 2**20):.2f}"
        )
    if "import-tp2" in runs:
        per_rank = runs["import-tp2"][0]["rank_bytes"]
        print(
            f"TP=2 import bytes requested per rank: {[f'{b / model_bytes:.3f}' for b in per_rank]} of the "
            f"checkpoint, total {sum(per_rank) / model_bytes:.3f}; peak RSS columns are the busiest rank"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
