"""A conversion command's inputs, checked before torch is imported.

``argument_problem`` (convert.py) checks the numbers and --out; these check what the inputs
are, in well under a second: the --hf folder holds config.json (a Megatron checkpoint given
there is named as one), the --megatron folder is a checkpoint (an HF folder given there is
named as one) holding the --iteration asked for, --dtype is a dtype, --revision goes with a
Hub id, and the parallel layout divides the model's heads, query groups, layers, experts and
vocabulary rows. The config is read with json and converted by the bridge's own code (torch-
free: ``bridgegen.plan.bridges`` and ``Bridge.to_megatron_config``); transformers' check of it
stays with the conversion, which imports torch. Every message says what to do.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bridgegen.bridge.errors import BridgeError
from bridgegen.formats.folders import CONFIG_LIMIT, TRACKER_LIMIT, read_hf_config, read_small_text

# Megatron-LM's checkpoint layout (formats.megatron_lm, which imports torch).
TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
ITERATION_FOLDER = re.compile(r"^iter_(\d{7})$")
RECORD_FILE = "bridgegen.json"  # formats.megatron_checkpoint.BRIDGE_FILE
# plan.values.DTYPE_NAMES, which imports torch.
DTYPE_NAMES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32")


def input_problem(command: str, args: argparse.Namespace) -> str | None:
    """What is wrong with the inputs of ``import``, ``export`` or ``verify``, found without
    torch; None if nothing found is (the conversion checks the rest)."""
    check = {"import": _import_problem, "export": _export_problem, "verify": _verify_problem}[command]
    try:
        return check(args)
    except (BridgeError, OSError) as exc:  # a config the conversion refuses alike, said now
        return str(exc)


# ------------------------------------------------------------------------------ commands


def _import_problem(args: argparse.Namespace) -> str | None:
    problem = _dtype_problem(args.dtype) or _hf_folder_problem(Path(args.hf), "import")
    if problem is not None:
        return problem
    values = hf_config_values(Path(args.hf))
    if getattr(args, "drop_mtp", False):
        values["mtp_num_layers"] = None
    rows = _padded(values, args.vocab_multiple)
    pad = f"; pad them with --vocab-multiple {args.tp} (or a multiple of it)"
    return layout_problem(values, args, rows, pad)


def _export_problem(args: argparse.Namespace) -> str | None:
    problem = (
        _dtype_problem(args.dtype)
        or _megatron_folder_problem(Path(args.megatron), args.iteration, "export")
        or _family_problem(args.family)
        or _hf_config_problem(args.hf_config)
    )
    if problem is not None:
        return problem
    if args.hf_config is not None:
        values = hf_config_values(Path(args.hf_config))
        return layout_problem(values, args, None, "")
    recorded = _recorded_values(Path(args.megatron), args.iteration)
    if recorded is None:
        return None  # Megatron-LM's args or a run_config.yaml: read by the conversion
    return layout_problem(recorded, args, _padded(recorded, 1), " of the checkpoint")


def _verify_problem(args: argparse.Namespace) -> str | None:
    problem = _dtype_problem(args.dtype) or _hf_folder_problem(Path(args.hf), "verify")
    if problem is None and args.megatron is not None:
        problem = (
            _megatron_folder_problem(Path(args.megatron), args.iteration, "verify")
            or _family_problem(args.family)
            or _hf_config_problem(args.hf_config)
        )
    elif problem is None:
        given = [
            f"--{name.replace('_', '-')}"
            for name in ("iteration", "family", "hf_config")
            if getattr(args, name)
        ]
        if given:
            return f"{' and '.join(given)} describe{'s' if len(given) == 1 else ''} a --megatron checkpoint; none is given"
    if problem is not None:
        return problem
    if args.megatron is not None and args.family is not None and args.hf_config is None:
        recorded = _recorded_values(Path(args.megatron), args.iteration)
        return None if recorded is None else layout_problem(recorded, args, _padded(recorded, 1), "")
    source = (
        Path(args.hf_config) if args.megatron is not None and args.hf_config is not None else Path(args.hf)
    )
    values = hf_config_values(source)
    return layout_problem(values, args, None if args.megatron else _padded(values, 1), "")


# ------------------------------------------------------------------------------ folders


def _dtype_problem(dtype: str | None) -> str | None:
    if dtype is None or dtype in DTYPE_NAMES:
        return None
    return f"--dtype {dtype!r} is not a dtype; choose one of {', '.join(DTYPE_NAMES)}"


def looks_like_megatron_checkpoint(folder: Path) -> bool:
    """A tracker, a DCP ``metadata.json`` or ``iter_*`` / ``release`` folders."""
    if (folder / TRACKER_FILE).is_file() or (folder / "metadata.json").is_file():
        return True
    return bool(present_iterations(folder))


def looks_like_hf_folder(folder: Path) -> bool:
    """config.json and safetensors weights, and nothing of a Megatron checkpoint."""
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and not looks_like_megatron_checkpoint(folder)
    )


def _hf_folder_problem(folder: Path, command: str) -> str | None:
    if not folder.exists():
        return f"{folder}: no such folder (--hf takes an HF model folder or a Hugging Face Hub id, org/name)"
    if not folder.is_dir():
        return f"{folder}: not a folder (--hf takes an HF model folder: config.json and safetensors)"
    if (folder / "config.json").is_file():
        return None
    if looks_like_megatron_checkpoint(folder):
        use = (
            f"use `bridgegen export --megatron {folder}` to convert it to HF"
            if command == "import"
            else "pass it as --megatron, with --hf the HF model it is compared with"
        )
        return f"{folder}: this is a Megatron checkpoint, not an HF folder: {use}"
    return f"{folder / 'config.json'}: no config.json in the HF folder"


def _hf_config_problem(value: str | None) -> str | None:
    if value is None:
        return None
    folder = Path(value)
    if not folder.is_dir():
        return f"--hf-config {folder}: no such folder"
    if not (folder / "config.json").is_file():
        return f"--hf-config {folder}: no config.json in it"
    return None


def _family_problem(family: str | None) -> str | None:
    if family is None:
        return None
    from bridgegen.plan.bridges import all_bridges

    families = sorted(bridge.family for bridge in all_bridges())
    if family in families:
        return None
    return f"--family {family!r}: no such family; known: {', '.join(families)} (see `bridgegen list`)"


def present_iterations(root: Path) -> list[str]:
    """The checkpoint folders in a tracker root: ``release``, then iteration numbers in order."""
    try:
        names = [entry.name for entry in root.iterdir() if entry.is_dir()]
    except OSError:
        return []
    numbers = sorted(int(m.group(1)) for name in names if (m := ITERATION_FOLDER.match(name)))
    return ([RELEASE] if RELEASE in names else []) + [str(n) for n in numbers]


def _megatron_folder_problem(root: Path, iteration: str | None, command: str) -> str | None:
    if not root.exists():
        return f"{root}: no such checkpoint folder"
    if not root.is_dir():
        return f"{root}: not a folder (--megatron takes a Megatron checkpoint folder)"
    if looks_like_hf_folder(root):
        use = (
            f"use `bridgegen import --hf {root}` to convert it to Megatron"
            if command == "export"
            else "pass it as --hf (verify converts it itself), or give --megatron the checkpoint made from it"
        )
        return f"{root}: this is an HF folder, not a Megatron checkpoint: {use}"
    present = present_iterations(root)
    if iteration is None:
        if (root / TRACKER_FILE).is_file() or (root / "metadata.json").is_file():
            return None  # the tracker's iteration is checked by the conversion
        if present:
            return (
                f"{root}: neither {TRACKER_FILE} nor metadata.json; it holds {', '.join(present)}: pass "
                "--iteration or the folder itself"
            )
        return f"{root}: neither {TRACKER_FILE} nor metadata.json: not a Megatron checkpoint folder"
    chosen = _iteration_folder(iteration)
    if chosen is None:
        return f"--iteration {iteration!r}: neither an iteration number nor 'release'"
    if (root / chosen).is_dir():
        return None
    shown = iteration if iteration == RELEASE else str(int(iteration))
    if not present and (root / "metadata.json").is_file():
        return f"--iteration {shown}: {root} is itself one checkpoint (metadata.json); leave --iteration out"
    return f"{root}: iteration {shown} absent (no {chosen} folder); present: {', '.join(present) or 'none'}"


def _iteration_folder(iteration: str) -> str | None:
    if iteration == RELEASE:
        return RELEASE
    if not re.fullmatch(r"\d+", iteration.strip()):
        return None
    return f"iter_{int(iteration):07d}"


def _recorded_values(root: Path, iteration: str | None) -> dict[str, Any] | None:
    """The Megatron config values ``bridgegen import`` recorded for the checkpoint (None: no
    record, or one this check cannot read, which the conversion reports)."""
    folders = [root]
    chosen = _iteration_folder(iteration) if iteration is not None else _tracked(root)
    if chosen is not None:
        folders.insert(0, root / chosen)
    elif (root / "metadata.json").is_file():  # an iteration folder given itself: its root next
        folders.append(root.parent)
    for folder in folders:
        record = folder / RECORD_FILE
        if record.is_file():
            try:
                values = json.loads(read_small_text(record, CONFIG_LIMIT, "bridgegen record"))[
                    "megatron_config"
                ]["values"]
            except (BridgeError, ValueError, KeyError, TypeError):
                return None
            return dict(values) if isinstance(values, dict) else None
    return None


def _tracked(root: Path) -> str | None:
    tracker = root / TRACKER_FILE
    if not tracker.is_file():
        return None
    try:
        return _iteration_folder(read_small_text(tracker, TRACKER_LIMIT, "tracker file").strip())
    except BridgeError:
        return None


# ------------------------------------------------------------------------------ the config


def hf_config_values(folder: Path) -> dict[str, Any]:
    """The Megatron config values of an HF folder's config.json, by its bridge, as the
    conversion makes them (its errors are the conversion's), without transformers' check."""
    from bridgegen.plan.bridges import bridge_for_config

    path = folder / "config.json"
    data = read_hf_config(folder)
    bridge = bridge_for_config(data)
    # transformers' check of a config runs for its model_type only (it imports torch): without
    # it the bridge's own checks run, and the bridge's first model type is taken.
    untyped = {key: value for key, value in data.items() if key != "model_type"}
    return dict(bridge.to_megatron_config(untyped, source=str(path)).values)


def _padded(values: Mapping[str, Any], multiple: int) -> int | None:
    """The embedding rows: the recorded count, or the vocab rounded up to ``multiple``."""
    if values.get("padded_vocab_size"):
        return int(values["padded_vocab_size"])
    vocab = _number(values.get("vocab_size"))
    multiple = _number(values.get("make_vocab_size_divisible_by")) or multiple
    return -(-vocab // multiple) * multiple if vocab else None


def _number(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def layout_problem(
    values: Mapping[str, Any], args: argparse.Namespace, rows: int | None, pad: str
) -> str | None:
    """What the parallel layout of ``args`` cannot split in a model of Megatron config
    ``values``, as megatron-core and the weight map would refuse it after torch is loaded."""
    tp, pp, vpp, ep = args.tp, args.pp, args.vpp, args.ep
    heads = _number(values.get("num_attention_heads"))
    groups = _number(values.get("num_query_groups")) or heads
    layers = _number(values.get("num_layers"))
    experts = _number(values.get("num_moe_experts"))
    if heads and heads % tp:
        return f"--tp {tp} does not divide the {heads} attention heads"
    if groups and groups % tp:
        return f"--tp {tp} does not divide the {groups} key/value heads (query groups); each rank holds whole ones"
    if rows and rows % tp:
        return f"--tp {tp} does not divide the {rows} vocabulary rows{pad}"
    if ep > 1 and not experts:
        return f"--ep {ep}: this model has no experts to split (expert parallelism is for mixture-of-experts models)"
    if experts and experts % ep:
        return f"--ep {ep} does not divide the {experts} experts"
    return (
        _pipeline_problem(layers, pp, vpp, args.first_stage_layers, args.last_stage_layers)
        if layers
        else None
    )


def _pipeline_problem(
    layers: int, pp: int, vpp: int | None, first: int | None, last: int | None
) -> str | None:
    uneven = [
        (flag, n)
        for flag, n in (("--first-stage-layers", first), ("--last-stage-layers", last))
        if n is not None
    ]
    if not uneven:
        if layers % pp:
            return (
                f"--pp {pp} does not divide the {layers} layers (--first-stage-layers / --last-stage-layers "
                "give the first and last stages their own count)"
            )
        if vpp is not None and pp > 1 and (layers // pp) % vpp:
            return (
                f"--vpp {vpp} does not divide the {layers // pp} layers of each of the {pp} pipeline stages"
            )
        return None
    given = " ".join(f"{flag} {n}" for flag, n in uneven)
    middle_layers = layers - sum(n for _, n in uneven)
    middle_stages = pp - len(uneven)
    if middle_layers < 0:
        return f"{given}: more layers than the model's {layers}"
    if middle_stages < 0 or bool(middle_layers) != bool(middle_stages):
        return (
            f"--pp {pp} with {given}: {middle_layers} layers remain for {max(middle_stages, 0)} middle stages"
        )
    if middle_stages and middle_layers % middle_stages:
        return f"--pp {pp} with {given}: the {middle_layers} remaining layers do not divide over {middle_stages} middle stages"
    if vpp is not None:
        for flag, n in uneven:
            if n % vpp:
                return f"--vpp {vpp} does not divide {flag} {n}"
        if middle_stages and (middle_layers // middle_stages) % vpp:
            return f"--vpp {vpp} does not divide the {middle_layers // middle_stages} layers of each middle stage"
    return None
