"""Conversion subcommands: ``import`` (HF -> Megatron), ``export`` (Megatron -> HF), ``verify``.

Each runs at any parallel layout. Under torchrun every process runs the command; without
torchrun, a layout of several ranks is run on that many local processes (gloo).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bridgegen.cli.ranks import ranks_for, run_command

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
    input folder. None if nothing is. The inputs themselves are checked next
    (``before_any_work``), still without torch."""
    import math

    from bridgegen.formats.folders import output_problem

    for field, least in AT_LEAST.items():
        value = getattr(args, field, None)
        if value is not None and value < least:
            return f"--{field.replace('_', '-')} must be at least {least}, got {value}"
    workers, cores = getattr(args, "workers", 1), os.cpu_count() or 1
    if workers > cores:
        return (
            f"--workers {workers}: more than this machine's {cores} cores; each worker is a process "
            f"with its own reading and writing, so at most {cores}"
        )
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

def _resolve_hub_ids(args: argparse.Namespace) -> str | None:
    """Replace an --hf (or --hf-config) that is a Hugging Face Hub id by its snapshot folder
    (``cli.hub``), saying where it is read from; what is wrong if that fails, or if --revision
    is given without a Hub id."""
    from bridgegen.cli import hub
    from bridgegen.formats.folders import output_problem

    revision = getattr(args, "revision", None)
    resolved = False
    for field, weights in (("hf", True), ("hf_config", False)):
        value = getattr(args, field, None)
        if value is None or not hub.is_hub_id(value):
            continue
        try:
            found = hub.resolve(value, revision, weights=weights)
        except hub.HubError as exc:
            return str(exc)
        except KeyboardInterrupt:  # what was fetched stays in the cache for the next run
            return f"{value}: interrupted while fetching it from the Hugging Face Hub"
        how = "fetched into" if found.fetched else "read from"
        at = f" at {revision}" if revision else ""
        print(f"{value}{at}: {how} the Hugging Face cache, {found.folder}", flush=True)
        setattr(args, field, str(found.folder))
        resolved = True
    if revision is not None and not resolved:
        given = getattr(args, "hf", None) or getattr(args, "hf_config", None)
        return f"--revision {revision}: for a Hugging Face Hub id (org/name); {given} is not one"
    out = getattr(args, "out", None)
    if resolved and out is not None:
        return output_problem(out, [getattr(args, field, None) for field in ("hf", "megatron", "hf_config")])
    return None


def before_any_work(name: str, args: argparse.Namespace) -> str | None:
    """Everything checked before torch is imported (``argument_problem``, Hub ids,
    ``early_checks.input_problem``), in that order; what is wrong, or None."""
    from bridgegen.cli.early_checks import input_problem
    from bridgegen.cli.ranks import our_warnings

    problem = argument_problem(args)
    if problem is not None:
        return problem
    with our_warnings(name):
        return _resolve_hub_ids(args) or input_problem(name, args)


def _dispatch(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        problem = before_any_work(name, args)
        if problem is not None:
            print(f"bridgegen {name}: error: {problem}", file=sys.stderr)
            return 2
        from bridgegen.engines.supervise import Stopped, signals_as_stops, watching

        out = getattr(args, "out", None)
        before = _identity(out)
        try:
            with signals_as_stops(), watching(out):
                return _run_here_or_on_ranks(name, args)
        except Stopped as exc:
            if out is not None:
                from bridgegen.formats.folders import remove_partial_outputs

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
                from bridgegen.engines.launch import end_process_groups

                end_process_groups()
        return 1 if result is False else 0
    from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

    from bridgegen.engines.launch import RankErrors, run_on_ranks
    from bridgegen.formats.folders import remove_partial_outputs

    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    try:
        results = run_on_ranks(run_command, world, name, plain, False)
    except RankErrors as exc:
        # Ranks often fail alike (each reads the same corrupt item): each error is said once.
        for message, ranks in _own_reasons(exc.by_message()).items():
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

HF_HELP = (
    "HF model folder (config.json and safetensors), or a Hugging Face Hub id (org/name): read from the "
    "local Hugging Face cache, else fetched (config, safetensors, tokenizer files only)"
)
REVISION_HELP = "revision (branch, tag or commit) of a Hugging Face Hub id given to --hf (default: main)"
HF_CONFIG_HELP = "HF folder (or Hugging Face Hub id) whose config.json describes the model (and tokenizer files)"


# What a rank says when another rank ended while they were in a collective (gloo, NCCL): an
# echo of that rank's failure, not a reason of its own.
PEER_GONE = ("Connection closed by peer", "remote worker crashing", "Connection reset by peer", "NCCL communicator was aborted")


def _own_reasons(messages: dict[str, list[int]]) -> dict[str, list[int]]:
    """The ranks' errors (each with the ranks that said it) without the echoes of a peer's
    failure, where a rank said its own reason."""
    own = {message: ranks for message, ranks in messages.items() if not any(gone in message for gone in PEER_GONE)}
    return own or messages


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
    p.add_argument("--hf", required=True, help=HF_HELP)
    p.add_argument("--revision", help=REVISION_HELP)
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
    p.add_argument("--hf-config", help=HF_CONFIG_HELP)
    p.add_argument("--revision", help="revision of a Hugging Face Hub id given to --hf-config (default: main)")
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
        description="Builds the Megatron model (fp32, or --dtype) from an HF folder (or a Megatron checkpoint "
        "of it) at the given layout, runs both on the same random tokens, and prints max|diff|, mean|diff| and "
        "argmax agreement. Exit 1 on mismatch.",
    )
    p.add_argument("--hf", required=True, help=HF_HELP + "; the reference model")
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--megatron", help="Megatron checkpoint to compare instead of a fresh import of --hf")
    p.add_argument(
        "--iteration", help="iteration of --megatron to compare: a number or 'release' (default: the tracker's)"
    )
    p.add_argument(
        "--family",
        help="bridge family (see `bridgegen list`) of a --megatron checkpoint: its config is then read from "
        "the checkpoint (bridgegen.json, Megatron-LM's args or Megatron-Bridge's run_config.yaml) instead "
        "of --hf",
    )
    p.add_argument("--hf-config", help=HF_CONFIG_HELP + " of --megatron (default: --hf's)")
    p.add_argument(
        "--dtype",
        help="dtype both models run in: float32 | bfloat16 | float16 (default float32; raise --tolerance "
        "for the others)",
    )
    p.add_argument("--seq-len", type=int, default=32, help="tokens in each sequence (default 32)")
    p.add_argument("--batch", type=int, default=2, help="sequences of random tokens (default 2)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest accepted max|diff| (default 1e-5)")
    _add_layout(p)
    p.set_defaults(func=_dispatch("verify"))
