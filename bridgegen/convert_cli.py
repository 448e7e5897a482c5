"""Conversion subcommands: ``import`` (HF -> Megatron), ``export`` (Megatron -> HF), ``verify``.

Each runs at any parallel layout. Under torchrun every process runs the command; without
torchrun, a layout of several ranks is run on that many local processes (gloo).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from bridgegen.runtime.errors import BridgeError, BridgeWarning


def _layout(args: argparse.Namespace) -> Any:
    from bridgegen.runtime.distributed import ParallelLayout

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


def _say(text: str) -> None:
    if _rank() == 0:
        print(text, flush=True)


def import_on_rank(args: argparse.Namespace) -> None:
    from bridgegen.runtime.convert import ModelBridge, parse_dtype
    from bridgegen.runtime.distributed import ParallelLayout, build_chunks, load_hf
    from bridgegen.runtime.megatron_checkpoint import save_megatron
    from bridgegen.runtime.stream import stream_import

    start = time.perf_counter()
    from bridgegen.runtime.formats.key_names import KeyNames

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
        _say(
            f"rank 0 read {stats.bytes_requested / 2**20:.1f} MiB for {stats.tensors} tensors, no model built"
        )
    else:
        chunks = build_chunks(bridge, _layout(args), dtype)
        stats = load_hf(bridge, chunks, args.hf, progress=True, allow_lossy_casts=args.dtype is not None)
        _say(f"rank 0 read {stats.bytes_requested / 2**20:.1f} MiB for {stats.tensors} tensors")
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
        from bridgegen.runtime.megatron_checkpoint import ARGS_FILE

        text = (Path(args.out) / ARGS_FILE).read_text()
        print(f"Megatron-LM model arguments for this checkpoint (also in {Path(args.out) / ARGS_FILE}):")
        print(text, end="", flush=True)


def export_on_rank(args: argparse.Namespace) -> None:
    from bridgegen.runtime.distributed import ParallelLayout, build_chunks, export_hf
    from bridgegen.runtime.megatron_checkpoint import bridge_for_checkpoint, load_megatron
    from bridgegen.runtime.stream import stream_export

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
        _say(f"wrote HF folder {args.out} in {time.perf_counter() - start:.1f} s, no model built")
        return
    bridge, saved_dtype = bridge_for_checkpoint(
        args.megatron, iteration=args.iteration, family=args.family, hf_config=args.hf_config
    )
    chunks = build_chunks(bridge, _layout(args), saved_dtype)
    load_megatron([c.model for c in chunks], args.megatron, iteration=args.iteration)
    export_hf(
        bridge,
        chunks,
        args.out,
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
    )
    _say(f"wrote HF folder {args.out} in {time.perf_counter() - start:.1f} s")


def verify_on_rank(args: argparse.Namespace) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.distributed import build_chunks, forward_logits, load_hf
    from bridgegen.runtime.megatron_checkpoint import bridge_for_checkpoint, load_megatron
    from bridgegen.runtime.verify import compare

    bridge = ModelBridge.from_hf_dir(args.hf)
    if args.megatron:
        bridge, _ = bridge_for_checkpoint(args.megatron, hf_config=args.hf)
    chunks = build_chunks(bridge, _layout(args), torch.float32, parallel_output=False)
    if args.megatron:
        load_megatron([c.model for c in chunks], args.megatron)
    else:
        load_hf(bridge, chunks, args.hf)
    vocab = bridge.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    logits = forward_logits(chunks, tokens, vocab)
    if logits is None:
        return True
    auto: Any = AutoModelForCausalLM
    reference = auto.from_pretrained(args.hf, dtype=torch.float32)
    reference.train(False)
    with torch.no_grad():
        parity = compare(reference(tokens).logits.float(), logits)
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_rank() == 0:
        verdict = "OK" if parity.ok(args.tolerance) else "MISMATCH"
        print(f"{verdict}: {parity} (tolerance {args.tolerance:g}, fp32, layout {_layout(args)})", flush=True)
    return parity.ok(args.tolerance)


def quiet_third_party() -> None:
    """Keep megatron-core's and torch's notices about optional kernels (Apex, Transformer
    Engine) and deprecations off the terminal, so our own output is what a user reads.
    BRIDGEGEN_SHOW_WARNINGS=1 shows them."""
    import logging
    import warnings

    if os.environ.get("BRIDGEGEN_SHOW_WARNINGS"):
        return
    for module in (r"megatron(\..*)?", r"torch(\..*)?", r"transformers(\..*)?"):
        warnings.filterwarnings("ignore", module=module)
    # torch.utils.cpp_extension: "No CUDA runtime is found" from torch's CUDA build on a CPU
    # machine, once per process (so once per local rank).
    for logger in ("megatron", "megatron.core", "torch.distributed", "torch.utils.cpp_extension"):
        logging.getLogger(logger).setLevel(logging.ERROR)


def run_command(name: str, args: argparse.Namespace, report: bool = True) -> Any:
    """One rank's work, with any conversion error printed as ``rank N: error: ...`` (or, not
    ``report``, raised for the process that started the local ranks to report once)."""
    import warnings

    quiet_third_party()
    command = {"import": import_on_rank, "export": export_on_rank, "verify": verify_on_rank}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("always", BridgeWarning)  # one line per tensor, however many
        warnings.showwarning = _show_our_warnings(name, warnings.showwarning)
        try:
            if name != "verify" and os.environ.get("WORLD_SIZE", "1") == "1" and ranks_for(args) == 1:
                # One process: transformers' check of the config runs beside the conversion.
                from bridgegen.runtime.config import config_checks_alongside

                with config_checks_alongside():
                    return command(args)
            return command(args)
        except BridgeError as exc:
            if not report:
                raise
            print(f"bridgegen {name}: rank {_rank()}: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


def _show_our_warnings(name: str, others: Any) -> Any:
    """Our own warnings as one line each, written above a running progress bar."""

    def show(message: Warning | str, category: type[Warning], *rest: Any, **more: Any) -> None:
        if not issubclass(category, BridgeWarning):
            others(message, category, *rest, **more)
            return
        from tqdm import tqdm

        tqdm.write(f"bridgegen {name}: rank {_rank()}: warning: {message}", file=sys.stderr)

    return show


# Numbers the conversion commands take, and the least each may be.
AT_LEAST = {
    "tp": 1,
    "pp": 1,
    "vpp": 1,
    "ep": 1,
    "etp": 1,
    "first_stage_layers": 1,
    "last_stage_layers": 1,
    "workers": 1,
    "vocab_multiple": 1,
    "seq_len": 1,
    "batch": 1,
}


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a conversion command's arguments before any work starts: a number
    out of range, an existing --out without --overwrite, an --out that is, holds or lies in an
    input folder. None if nothing is."""
    import math

    from bridgegen.runtime.folders import output_problem

    for field, least in AT_LEAST.items():
        value = getattr(args, field, None)
        if value is not None and value < least:
            return f"--{field.replace('_', '-')} must be at least {least}, got {value}"
    shard_gb = getattr(args, "max_shard_gb", None)
    if shard_gb is not None and not (math.isfinite(shard_gb) and shard_gb > 0):
        return f"--max-shard-gb must be a positive number, got {shard_gb}"
    tolerance = getattr(args, "tolerance", None)
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        return f"--tolerance must be a number of at least 0, got {tolerance}"
    out = getattr(args, "out", None)
    if out is None:
        return None
    if Path(out).exists() and not args.overwrite:
        return f"{out}: output folder exists; pass --overwrite to replace it"
    inputs = [getattr(args, field, None) for field in ("hf", "megatron", "hf_config")]
    return output_problem(out, inputs)


def ranks_for(args: argparse.Namespace) -> int:
    """Local processes a layout needs: pipeline stages times the fewest ranks per stage that
    hold both a TP group and an expert group of EP x expert-TP ranks (expert-TP defaults to
    TP, as megatron-core's does); --workers for a run without a layout."""
    import math

    expert_ranks = args.ep * (args.etp if args.etp is not None else args.tp)
    return int(args.pp * math.lcm(args.tp, expert_ranks) * getattr(args, "workers", 1))


def _dispatch(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        problem = argument_problem(args)
        if problem is not None:
            print(f"bridgegen {name}: error: {problem}", file=sys.stderr)
            return 2
        from bridgegen.runtime.supervise import Stopped, signals_as_stops, watching

        out = getattr(args, "out", None)
        before = _identity(out)
        try:
            with signals_as_stops(), watching(out):
                return _run_here_or_on_ranks(name, args)
        except Stopped as exc:
            if out is not None:
                from bridgegen.runtime.folders import remove_partial_outputs

                remove_partial_outputs(out, own=True)
            written = out is not None and _identity(out) not in (None, before)
            # From the start of the line: a rank ended mid-bar leaves its progress bar unfinished.
            print(
                f"\rbridgegen {name}: error: {exc}" + (f" after {out} was written" if written else ""),
                file=sys.stderr,
            )
            return exc.exit_code

    return run


def _identity(folder: str | None) -> tuple[int, int] | None:
    """Which folder ``folder`` is now (device, inode), or None if there is none."""
    if folder is None:
        return None
    try:
        found = os.stat(folder)
    except FileNotFoundError:
        return None
    return (found.st_dev, found.st_ino)


def _run_here_or_on_ranks(name: str, args: argparse.Namespace) -> int:
    """Run the command in this process (one rank, or a rank torchrun started), or on the local
    processes its layout needs; a rank's failure or a stop ends them all, and the temp folders
    the ended ranks leave beside --out are removed."""
    world = ranks_for(args)
    torchrun = "WORLD_SIZE" in os.environ
    if torchrun or world == 1:
        try:
            result = run_command(name, args)
        finally:
            if torchrun:  # a rank torchrun started: its groups end with the command
                from bridgegen.runtime.launch import end_process_groups

                end_process_groups()
        return 1 if result is False else 0
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    from bridgegen.runtime.folders import remove_partial_outputs
    from bridgegen.runtime.launch import RankErrors, run_on_ranks

    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    try:
        results = run_on_ranks(run_command, world, name, plain, False)
    except RankErrors as exc:
        # Ranks often fail alike (each reads the same corrupt item): each error is said once.
        for message, ranks in exc.by_message().items():
            print(f"\rbridgegen {name}: rank {ranks[0]}: error: {message}", file=sys.stderr)
        return 2
    except (ProcessExitedException, ProcessRaisedException) as exc:
        print(
            f"bridgegen {name}: failed on a rank ({exc.__class__.__name__}); all ranks stopped",
            file=sys.stderr,
        )
        return 2
    finally:
        if getattr(args, "out", None):
            remove_partial_outputs(args.out)
    return 1 if any(r is False for r in results) else 0


def _add_layout(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "parallel layout", "run under torchrun with tp*pp processes, or without it to use local processes"
    )
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    group.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank")
    group.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
    group.add_argument(
        "--etp", type=int, default=None, help="expert tensor parallel size (default: the tensor parallel size)"
    )
    group.add_argument(
        "--first-stage-layers", type=int, default=None, help="layers on the first pipeline stage (uneven PP)"
    )
    group.add_argument(
        "--last-stage-layers", type=int, default=None, help="layers on the last pipeline stage (uneven PP)"
    )


def add_conversion_commands(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="convert an HF checkpoint folder into a Megatron checkpoint that Megatron-LM and "
        "Megatron-Bridge load as it is",
        description="Read an HF folder (config.json + safetensors), build the Megatron-Core model its bridge "
        "describes at the given layout, let each rank read only its own slices, and save a torch_dist "
        "checkpoint laid out as Megatron-LM saves one: OUT/latest_checkpointed_iteration.txt ('release') and "
        "OUT/release/ with the common state (args, checkpoint_version, iteration, content_metadata). Beside "
        "it: bridgegen.json (the bridge config), hf_side_files/ (tokenizer) and megatron_lm_args.txt, the "
        "Megatron-LM flags that build this exact model (also printed). Train with "
        "`--load OUT` (Megatron-LM) or checkpoint.pretrained_checkpoint=OUT (Megatron-Bridge). Atomic.",
    )
    p.add_argument("--hf", required=True, help="HF model folder")
    p.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    p.add_argument(
        "--dtype", help="parameter dtype: float32 | bfloat16 | float16 (default: the checkpoint's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--drop-mtp",
        action="store_true",
        help="leave out multi-token prediction layers (their tensors are skipped)",
    )
    p.add_argument(
        "--key-names",
        choices=["te", "local"],
        default="te",
        help="checkpoint key names: 'te' as the Transformer Engine layer spec names them (Megatron-LM's "
        "and Megatron-Bridge's default), 'local' for --transformer-impl local (default: te)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local processes that share the work of an import without a layout (each reads and writes "
        "about 1/N of the bytes; under torchrun the processes it starts do)",
    )
    p.add_argument(
        "--vocab-multiple",
        type=int,
        default=1,
        help="pad the embedding / output rows to a multiple of this. Default 1: the HF vocab exactly, as "
        "Megatron-Bridge builds it (should_pad_vocab false); Megatron-LM is told the count with "
        "--padded-vocab-size. 128 x TP reproduces Megatron-LM's own padding",
    )
    _add_layout(p)
    p.set_defaults(func=_dispatch("import"))

    p = sub.add_parser(
        "export",
        help="convert a Megatron checkpoint (ours, Megatron-LM's or Megatron-Bridge's) to an HF folder",
        description="Load a torch_dist checkpoint saved at any layout, with Transformer Engine or local key "
        "names, stacked or per-layer keys, by megatron-core 0.16 to 0.19 (common.pt or the common state "
        "inside the DCP files), and write an HF folder: config.json, tokenizer files, sharded safetensors "
        "with an index. --megatron is a folder with latest_checkpointed_iteration.txt (the latest "
        "iteration is taken, or --iteration), an iter_*/release folder, or a flat checkpoint. The config "
        "comes from bridgegen.json (written by `bridgegen import`), else --hf-config, else the "
        "checkpoint's Megatron-LM args or Megatron-Bridge run_config.yaml with --family. Optimizer and "
        "RNG state are never read. Atomic.",
    )
    p.add_argument("--megatron", required=True, help="Megatron checkpoint folder")
    p.add_argument("--iteration", help="iteration to export: a number or 'release' (default: the tracker's)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local processes that share an export without a layout (each reads and writes about 1/N of "
        "the bytes; under torchrun the processes it starts do)",
    )
    p.add_argument(
        "--family", help="bridge family (see `bridgegen list`) for a checkpoint without bridgegen.json"
    )
    p.add_argument(
        "--hf-config", help="HF folder whose config.json describes the model (and tokenizer files)"
    )
    p.add_argument("--out", required=True, help="HF folder to create")
    p.add_argument("--dtype", help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB (default 5)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_layout(p)
    p.set_defaults(func=_dispatch("export"))

    p = sub.add_parser(
        "verify",
        help="run HF and Megatron forward on the same tokens and compare logits",
        description="Builds the Megatron model in fp32 from an HF folder (or a Megatron checkpoint of it) at "
        "the given layout, runs both on the same random tokens, and prints max|diff|, mean|diff| and argmax "
        "agreement. Exit 1 on mismatch.",
    )
    p.add_argument("--hf", required=True, help="HF model folder (the reference)")
    p.add_argument("--megatron", help="Megatron checkpoint to compare instead of a fresh import")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted max|diff| (default 1e-5)")
    _add_layout(p)
    p.set_defaults(func=_dispatch("verify"))
