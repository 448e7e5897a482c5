"""Functions run on several gloo ranks by tests/test_distributed.py (spawned processes import
this module by name, so it must stay importable and side-effect free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SEQ = 16
BATCH = 2


def tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def convert(
    hf_dir: str, out_dir: str, layout: dict[str, Any], checkpoint_dir: str | None = None
) -> dict[str, Any]:
    """Import at ``layout``, run forward, export to ``out_dir`` (and optionally save a dist
    checkpoint). Returns this rank's logits (last stage only) and bytes read."""
    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.distributed import ParallelLayout, build_chunks, export_hf, forward_logits, load_hf
    from bridgegen.runtime.megatron_checkpoint import save_megatron

    bridge = ModelBridge.from_hf_dir(hf_dir)
    chunks = build_chunks(bridge, ParallelLayout(**layout), torch.float32, parallel_output=False)
    stats = load_hf(bridge, chunks, hf_dir)
    logits = forward_logits(chunks, tokens(bridge.config.vocab_size), bridge.config.vocab_size)
    export_hf(bridge, chunks, out_dir, max_shard_bytes=200_000)
    if checkpoint_dir is not None:
        save_megatron(
            [c.model for c in chunks],
            bridge,
            checkpoint_dir,
            dtype=torch.float32,
            hf_source=hf_dir,
        )
    return {"logits": logits, "bytes_requested": stats.bytes_requested}


def export_checkpoint(checkpoint_dir: str, out_dir: str, layout: dict[str, Any]) -> None:
    """Load a dist checkpoint at ``layout`` and export it to an HF folder."""
    from bridgegen.runtime.distributed import ParallelLayout, build_chunks, export_hf
    from bridgegen.runtime.megatron_checkpoint import bridge_for_checkpoint, load_megatron

    bridge, dtype = bridge_for_checkpoint(checkpoint_dir)
    chunks = build_chunks(bridge, ParallelLayout(**layout), dtype)
    load_megatron([c.model for c in chunks], checkpoint_dir)
    export_hf(bridge, chunks, out_dir)


class InjectedFailure(RuntimeError):
    pass


def fail_on_rank_1(hf_dir: str, out_dir: str, layout: dict[str, Any], when: str) -> None:
    """Like ``convert`` but rank 1 fails mid-import (``when="import"``), mid-export
    (``"export"``) or while saving the dist checkpoint (``"save"``)."""
    import torch.distributed as dist

    import bridgegen.runtime.distributed as distributed
    import bridgegen.runtime.weights as weights
    from bridgegen.runtime.convert import ModelBridge
    from bridgegen.runtime.distributed import ParallelLayout, build_chunks, export_hf, load_hf
    from bridgegen.runtime.megatron_checkpoint import save_megatron

    if dist.get_rank() == 1:
        if when == "import":
            real_load = weights.load_shard
            calls = {"n": 0}

            def failing_load(*args: Any, **kwargs: Any) -> None:
                calls["n"] += 1
                if calls["n"] == 3:
                    raise InjectedFailure("rank 1 fails mid-import")
                real_load(*args, **kwargs)

            weights.load_shard = failing_load  # type: ignore[assignment]
        elif when == "export":
            real_store = distributed.shard_writes
            stored = {"n": 0}

            def failing_store(*args: Any, **kwargs: Any) -> Any:
                stored["n"] += 1
                if stored["n"] == 3:
                    raise InjectedFailure("rank 1 fails mid-export")
                return real_store(*args, **kwargs)

            distributed.shard_writes = failing_store  # type: ignore[assignment]
    bridge = ModelBridge.from_hf_dir(hf_dir)
    chunks = build_chunks(bridge, ParallelLayout(**layout), torch.float32)
    load_hf(bridge, chunks, hf_dir)
    if when == "save":
        if dist.get_rank() == 1:
            raise InjectedFailure("rank 1 fails while saving")
        save_megatron([c.model for c in chunks], bridge, out_dir, dtype=torch.float32)
    else:
        export_hf(bridge, chunks, out_dir)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
