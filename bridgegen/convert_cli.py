"""Conversion subcommands: ``import`` (HF -> Megatron), ``export`` (Megatron -> HF), ``verify``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bridgegen.runtime.errors import BridgeError


def _cmd_import(args: argparse.Namespace) -> int:
    from bridgegen.runtime.convert import ModelBridge, parse_dtype
    from bridgegen.runtime.megatron_checkpoint import save_megatron

    start = time.perf_counter()
    bridge = ModelBridge.from_hf_dir(args.hf)
    dtype = parse_dtype(args.dtype) or bridge.default_dtype()
    if Path(args.out).exists() and not args.overwrite:
        raise BridgeError(f"{args.out}: output folder exists; pass --overwrite to replace it")
    print(
        f"{args.hf}: {bridge.config.hf_architecture} -> {bridge.bridge.__name__} ({bridge.config.family}), {dtype}"
    )
    model = bridge.build_model(dtype)
    stats = bridge.load_hf_weights(model, progress=not args.quiet)
    save_megatron(model, bridge.config, args.out, dtype=dtype, hf_source=args.hf, overwrite=args.overwrite)
    print(
        f"wrote Megatron dist checkpoint {args.out}: {stats.tensors} tensors, "
        f"{stats.bytes_requested / 2**20:.1f} MiB read, {time.perf_counter() - start:.1f} s"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bridgegen.runtime.convert import ModelBridge, parse_dtype
    from bridgegen.runtime.megatron_checkpoint import SIDE_FILES_DIR, load_megatron, read_record

    start = time.perf_counter()
    config, saved_dtype = read_record(args.megatron)
    from bridgegen.generated import BRIDGES

    bridge_cls = next((b for b in BRIDGES if b.family == config.family), None)
    if bridge_cls is None:
        raise BridgeError(f"{args.megatron}: family {config.family!r} has no bridge in this version")
    side = Path(args.megatron) / SIDE_FILES_DIR
    bridge = ModelBridge(bridge_cls, config, side if side.is_dir() else None)
    model = bridge.build_model(saved_dtype)
    load_megatron(model, args.megatron)
    bridge.export_hf(
        model,
        args.out,
        overwrite=args.overwrite,
        dtype=parse_dtype(args.dtype),
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        progress=not args.quiet,
    )
    print(f"wrote HF folder {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.megatron_checkpoint import load_megatron
    from bridgegen.runtime.verify import hf_vs_megatron

    bridge = ModelBridge.from_hf_dir(args.hf)
    model = bridge.build_model(torch.float32)
    if args.megatron:
        load_megatron(model, args.megatron)
    else:
        bridge.load_hf_weights(model)
    parity = hf_vs_megatron(args.hf, model, bridge.config.vocab_size, batch=args.batch, seq_len=args.seq_len)
    verdict = "OK" if parity.ok(args.tolerance) else "MISMATCH"
    print(f"{verdict}: {parity} (tolerance {args.tolerance:g}, fp32)")
    return 0 if parity.ok(args.tolerance) else 1


def add_conversion_commands(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="convert an HF checkpoint folder into a Megatron-Core distributed checkpoint",
        description="Read an HF folder (config.json + safetensors), build the Megatron-Core model its bridge "
        "describes, load the weights lazily, and save a dist checkpoint with the bridge config beside it.",
    )
    p.add_argument("--hf", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    p.add_argument(
        "--dtype", help="parameter dtype: float32 | bfloat16 | float16 (default: the checkpoint's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard(_cmd_import))

    p = sub.add_parser(
        "export",
        help="convert a Megatron checkpoint written by `bridgegen import` back to an HF folder",
        description="Load a dist checkpoint (its bridge config is read from bridgegen.json) and write an HF "
        "folder: config.json, tokenizer files, sharded safetensors with an index. Atomic.",
    )
    p.add_argument("--megatron", required=True, help="Megatron checkpoint folder")
    p.add_argument("--out", required=True, help="HF folder to create")
    p.add_argument("--dtype", help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB (default 5)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard(_cmd_export))

    p = sub.add_parser(
        "verify",
        help="run HF and Megatron forward on the same tokens and compare logits",
        description="Builds the Megatron model in fp32 from an HF folder (or a Megatron checkpoint of it), runs "
        "both on the same random tokens, and prints max|diff|, mean|diff| and argmax agreement. Exit 1 "
        "on mismatch.",
    )
    p.add_argument("--hf", required=True, help="HF model folder (the reference)")
    p.add_argument("--megatron", help="Megatron checkpoint to compare instead of a fresh import")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted max|diff| (default 1e-5)")
    p.set_defaults(func=_guard(_cmd_verify))


def _guard(command: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except BridgeError as exc:
            print(f"bridgegen {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return run
