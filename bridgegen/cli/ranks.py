"""What one rank of a conversion command does: ``import``, ``export`` or ``verify`` with the
parsed arguments, its errors said as one line (``rank N:`` first only when several processes
run it), third-party notices kept off the terminal, summaries over every rank's share."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridgegen.bridge.errors import BridgeError, BridgeWarning


def _layout(args: argparse.Namespace) -> Any:
    from bridgegen.engines.distributed import ParallelLayout

    return ParallelLayout(
        tp=args.tp,
        pp=args.pp,
        vpp=args.vpp,
        ep=args.ep,
        etp=args.etp,
        first_stage_layers=args.first_stage_layers,
        last_stage_layers=args.last_stage_layers,
    )

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> tuple[int, int]:
    """(rank, world size) of this process, without importing torch: from torch.distributed
    once it is set up, else from the environment torchrun and the local launcher give."""
    rank, world = int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist: Any = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world


def who() -> str:
    """``rank N: `` when several processes run the command, else nothing."""
    rank, world = _world()
    return f"rank {rank}: " if world > 1 else ""


def _say(text: str) -> None:
    if _rank() == 0:
        print(text, flush=True)


def _over_ranks(stats: Any) -> tuple[Any, int]:
    """``stats`` (a LoadStats) summed over every rank, and the number of ranks."""
    import torch.distributed as dist

    from bridgegen.engines.weights import LoadStats

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats, 1
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, stats)
    return LoadStats.total(everyone), len(everyone)


def _ranks_text(count: int) -> str:
    return f" on {count} ranks" if count > 1 else ""

def import_on_rank(args: argparse.Namespace) -> None:
    from bridgegen.engines.checkpoint import save_megatron
    from bridgegen.engines.distributed import ParallelLayout, build_chunks, load_hf
    from bridgegen.engines.model import ModelBridge, parse_dtype
    from bridgegen.engines.stream_import import stream_import

    start = time.perf_counter()
    from bridgegen.plan.conversion import KeyNames

    bridge = ModelBridge.from_hf_dir(args.hf)
    if args.drop_mtp:
        bridge = bridge.without_mtp()
    bridge = dataclasses.replace(
        bridge.with_vocab_multiple(args.vocab_multiple), key_names=KeyNames(args.key_names)
    )
    dtype = parse_dtype(args.dtype) or bridge.default_dtype()
    _say(
        f"{args.hf}: {bridge.config.hf_architecture} -> {bridge.bridge.__name__}, {dtype}, layout {_layout(args)}"
    )
    _, carried = bridge.carried_tensors(args.hf)  # fails here, before any work, if they are missing
    wrapper = bridge.wrapper()
    if carried and wrapper is not None:
        prefixes = ", ".join(f"{prefix}*" for prefix in wrapper.carried_weights)
        size = sum(entry.nbytes for entry in carried) / 2**20
        _say(
            f"{len(carried)} tensors outside the language model ({prefixes}, {size:.1f} MiB) kept for export"
        )
    if _layout(args) == ParallelLayout():
        # A dist checkpoint is layout-free: no model is needed, only megatron-core's keys. Under
        # torchrun or --workers, each process writes its share.
        stats = stream_import(
            bridge,
            args.hf,
            args.out,
            dtype=dtype,
            overwrite=args.overwrite,
            progress=_rank() == 0,
            allow_lossy_casts=args.dtype is not None,
        )
        total, ranks = _over_ranks(stats)
        _say(
            f"read {total.bytes_requested / 2**20:.1f} MiB for {total.tensors} tensors{_ranks_text(ranks)}, "
            "no model built"
        )
    else:
        chunks = build_chunks(bridge, _layout(args), dtype)
        stats = load_hf(bridge, chunks, args.hf, progress=True, allow_lossy_casts=args.dtype is not None)
        total, ranks = _over_ranks(stats)
        shards = "tensor shards" if ranks > 1 else "tensors"
        _say(f"read {total.bytes_requested / 2**20:.1f} MiB for {total.tensors} {shards}{_ranks_text(ranks)}")
        save_megatron(
            [c.model for c in chunks],
            bridge,
            args.out,
            dtype=dtype,
            hf_source=args.hf,
            overwrite=args.overwrite,
        )
    _say(f"wrote Megatron checkpoint {args.out} in {time.perf_counter() - start:.1f} s")
    if _rank() == 0:
        from bridgegen.formats.megatron_checkpoint import ARGS_FILE

        text = (Path(args.out) / ARGS_FILE).read_text()
        print(f"Megatron-LM model arguments for this checkpoint (also in {Path(args.out) / ARGS_FILE}):")
        print(text, end="", flush=True)

def export_on_rank(args: argparse.Namespace) -> None:
    from bridgegen.engines.checkpoint import load_megatron
    from bridgegen.engines.distributed import ParallelLayout, build_chunks, export_hf
    from bridgegen.engines.model import bridge_for_checkpoint
    from bridgegen.engines.stream_export import stream_export

    start = time.perf_counter()
    if _layout(args) == ParallelLayout():
        # The checkpoint is read a batch of parameters at a time: no model is built. Under
        # torchrun or --workers, each process converts its share.
        stream_export(
            args.megatron,
            args.out,
            iteration=args.iteration,
            family=args.family,
            hf_config=args.hf_config,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            progress=_rank() == 0,
        )
        _say(f"wrote HF folder {args.out}{_written(args.out)} in {time.perf_counter() - start:.1f} s, no model built")
        return
    bridge, saved_dtype = bridge_for_checkpoint(
        args.megatron, iteration=args.iteration, family=args.family, hf_config=args.hf_config
    )
    chunks = build_chunks(bridge, _layout(args), saved_dtype)
    load_megatron([c.model for c in chunks], args.megatron, iteration=args.iteration, progress=_rank() == 0)
    export_hf(
        bridge,
        chunks,
        args.out,
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        progress=_rank() == 0,
    )
    _say(f"wrote HF folder {args.out}{_written(args.out)} in {time.perf_counter() - start:.1f} s")


def _written(folder: str) -> str:
    """What an exported folder holds, every rank's part of it (read on rank 0 only)."""
    if _rank() != 0:
        return ""
    from bridgegen.formats.safetensors import Checkpoint

    written = Checkpoint.open(folder)
    return f" ({len(written.tensors)} tensors, {written.total_bytes / 2**20:.1f} MiB)"

def verify_on_rank(args: argparse.Namespace) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    from bridgegen.engines.checkpoint import load_megatron
    from bridgegen.engines.distributed import build_chunks, forward_logits, load_hf
    from bridgegen.engines.model import ModelBridge, bridge_for_checkpoint, parse_dtype
    from bridgegen.engines.progress import progress_bar, transformers_bars_hidden
    from bridgegen.engines.verify import compare, counting_layers, decoder_layers

    dtype = parse_dtype(args.dtype) or torch.float32
    if args.megatron:
        # The checkpoint's config: --hf-config's, or with --family its own (bridgegen.json,
        # Megatron-LM's args, run_config.yaml), else that of the HF model it is compared with.
        hf_config = args.hf_config if args.hf_config is not None else None if args.family else args.hf
        bridge, _ = bridge_for_checkpoint(
            args.megatron, iteration=args.iteration, family=args.family, hf_config=hf_config
        )
    else:
        bridge = ModelBridge.from_hf_dir(args.hf)
    chunks = build_chunks(bridge, _layout(args), dtype, parallel_output=False)
    if args.megatron:
        load_megatron([c.model for c in chunks], args.megatron, iteration=args.iteration, progress=_rank() == 0)
    else:
        load_hf(bridge, chunks, args.hf, progress=_rank() == 0)
    vocab = bridge.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    layers = [layer for chunk in chunks for layer in decoder_layers(chunk.model)]
    with (
        progress_bar(_rank() == 0 and bool(layers), len(layers), "Megatron forward", unit="layer") as update,
        counting_layers(layers, update),
    ):
        logits = forward_logits(chunks, tokens, vocab)
    if logits is None:
        return True
    from megatron.core import parallel_state

    says = parallel_state.get_tensor_model_parallel_rank() == 0
    auto: Any = AutoModelForCausalLM
    with transformers_bars_hidden():
        reference = auto.from_pretrained(args.hf, dtype=dtype)
    reference.train(False)
    hf_layers = decoder_layers(reference)
    with (
        torch.no_grad(),
        progress_bar(says and bool(hf_layers), len(hf_layers), "HF forward", unit="layer") as update,
        counting_layers(hf_layers, update),
    ):
        parity = compare(reference(tokens).logits.float(), logits)
    if says:
        verdict = "OK" if parity.ok(args.tolerance) else "MISMATCH"
        shown = str(dtype).removeprefix("torch.")
        print(f"{verdict}: {parity} (tolerance {args.tolerance:g}, {shown}, layout {_layout(args)})", flush=True)
    return parity.ok(args.tolerance)


def quiet_third_party() -> None:
    """See ``engines.progress.quiet_third_party`` (the command's processes are ours)."""
    from bridgegen.engines.progress import quiet_third_party as quiet

    quiet()


@contextmanager
def our_warnings(name: str) -> Iterator[None]:
    """Within the block, our own warnings (``BridgeWarning``) are each said as one line,
    ``bridgegen NAME: [rank N: ]warning: ...``, every time (one per tensor, however many)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always", BridgeWarning)
        warnings.showwarning = _show_our_warnings(name, warnings.showwarning)
        yield


def run_command(name: str, args: argparse.Namespace, report: bool = True) -> Any:
    """One rank's work, with any conversion error printed as ``error: ...`` (``rank N: error:
    ...`` when several processes run it) or, not ``report``, raised for the process that
    started the local ranks to report once."""
    quiet_third_party()
    command = {"import": import_on_rank, "export": export_on_rank, "verify": verify_on_rank}[name]
    with our_warnings(name):
        try:
            if name != "verify" and os.environ.get("WORLD_SIZE", "1") == "1" and ranks_for(args) == 1:
                # One process: transformers' check of the config runs beside the conversion.
                from bridgegen.bridge.config_checks import config_checks_alongside

                with config_checks_alongside():
                    return command(args)
            return command(args)
        except (BridgeError, OSError) as exc:  # an OSError names its file: one line says it all
            if not report:
                raise
            print(f"bridgegen {name}: {who()}error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


def _show_our_warnings(name: str, others: Any) -> Any:
    """Our own warnings as one line each, written above a running progress bar."""

    def show(message: Warning | str, category: type[Warning], *rest: Any, **more: Any) -> None:
        if not issubclass(category, BridgeWarning):
            others(message, category, *rest, **more)
            return
        from tqdm import tqdm

        tqdm.write(f"bridgegen {name}: {who()}warning: {message}", file=sys.stderr)

    return show


def ranks_for(args: argparse.Namespace) -> int:
    """Local processes a layout needs: pipeline stages times the fewest ranks per stage that
    hold both a TP group and an expert group of EP x expert-TP ranks (expert-TP defaults to
    TP, as megatron-core's does); --workers for a run without a layout."""
    import math

    expert_ranks = args.ep * (args.etp if args.etp is not None else args.tp)
    return int(args.pp * math.lcm(args.tp, expert_ranks) * getattr(args, "workers", 1))
