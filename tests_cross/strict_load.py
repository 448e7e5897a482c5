"""Run by tests_cross/test_cross_version.py under one megatron-core version: import an HF folder,
or load a Megatron checkpoint strictly with megatron-core's own loader.

    python strict_load.py import HF OUT
    python strict_load.py load CHECKPOINT HF
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path


def strict_load(checkpoint: Path, hf_dir: Path) -> dict[str, object]:
    """megatron-core's ``dist_checkpointing.load`` with ``strict`` raising on any key the model
    asks for that the checkpoint lacks, and on any model tensor it holds that the model does not
    ask for. megatron-core 0.19 checks both itself (``StrictHandling.RAISE_ALL``); 0.16 would
    count the 0.19 common-state object as an unrequested key, so there it raises on missing keys
    and our key check (``megatron_checkpoint._check_keys``) raises on unrequested tensors."""
    import megatron.core
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from bridgegen.engines.model import ModelBridge
    from bridgegen.formats import dist_checkpoint, megatron_lm
    from bridgegen.formats.megatron_checkpoint import check_keys as _check_keys
    from bridgegen.formats.megatron_checkpoint import sharded_state_dict

    bridge = ModelBridge.from_hf_dir(hf_dir)
    model = bridge.build_model("float32")
    request = sharded_state_dict([model])
    folder = megatron_lm.find_checkpoint(checkpoint).path
    kwargs: dict[str, object] = {}
    if "common_strategy" in inspect.signature(dist_checkpointing.load).parameters:
        kwargs["common_strategy"] = dist_checkpoint.common_load_strategy()
        kwargs["strict"] = StrictHandling.RAISE_UNEXPECTED
        _check_keys(request, folder)
    else:
        kwargs["strict"] = StrictHandling.RAISE_ALL
    state = dist_checkpointing.load(request, str(folder), **kwargs)
    result = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    return {
        "megatron_core": megatron.core.__version__,
        "missing": missing,
        "unexpected": list(result.unexpected_keys),
        "loaded": sorted(k for k in state["model"] if not k.endswith("_extra_state")),
    }


def main() -> int:
    command, *rest = sys.argv[1:]
    if command == "import":
        from bridgegen.cli.main import main as cli

        hf, out = rest
        return cli(["import", "--hf", hf, "--out", out])
    if command == "load":
        checkpoint, hf = rest
        print(json.dumps(strict_load(Path(checkpoint), Path(hf))))
        return 0
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main())
