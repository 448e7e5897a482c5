"""Weight sync for RL, end to end on CPU: a trainer job sends its weights to an inference process.

    python examples/weight_sync_rl.py

* The **trainer** is a job of 4 gloo ranks (``bridgegen.engines.launch.run_on_ranks``) at
  TP=2 x PP=2, each holding its part of a megatron-core GPTModel of a tiny random Llama. The
  Llama is made with transformers (``from_config`` + ``save_pretrained`` into a temp folder),
  the trainer builds its model with ``build_chunks`` and fills it with ``load_hf``.
* The **receiver** is a separate process holding a transformers ``LlamaForCausalLM`` of the
  same config with other random weights (an inference engine's stand-in).
* The five processes (trainer ranks 0-3 as ranks 0-3, the receiver as rank 4) join ONE gloo
  process group, made by this script's own setup code over a ``FileStore`` in the temp folder.
  Every trainer rank calls ``WeightExport(bridge, model)(destinations={0})`` (collective in the
  trainer job); rank 0 sends each yielded HF tensor to rank 4 of that group (``send``), which
  receives it and copies it into its parameter of the same HF name, as an engine's
  ``load_weights`` does.
* Then the receiver's logits on a fixed token batch are compared with the HF source model's
  (loaded from the temp folder in the receiver) with ``torch.equal`` in fp32, and this script
  prints one line, ``weight sync parity: OK ...``, exiting 0 (1 where they differ).

Why the 5-process group is not the trainer's default group: megatron-core 0.16.1's
``initialize_model_parallel`` builds its groups from the default group's whole world
(``torch.distributed.get_world_size()``, which must be a multiple of TP x PP: 5 is not) and
``WeightExport`` / ``load_weights`` agree on their plan with an all-gather over the default
group, in which every rank must take part. So the trainer is its own job (its default group of 4
ranks, megatron-core's parallel state over it), and the group of 5 is a second gloo group,
``torch.distributed.ProcessGroupGloo`` over a store shared by both jobs -- the way RL frameworks
join a trainer and an inference engine that run as separate jobs. Rank 0 and the receiver use
its point-to-point ``send`` / ``recv``; ranks 1-3 join it and send nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TRAINER_RANKS = 4
RECEIVER = TRAINER_RANKS  # the receiver's rank in the group of 5
GROUP_SIZE = TRAINER_RANKS + 1
TIMEOUT = timedelta(seconds=120)
SEED_SOURCE, SEED_RECEIVER = 0, 1


def llama_config() -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def make_source(folder: Path) -> None:
    """The HF source model: random fp32 weights, saved as safetensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(SEED_SOURCE)
    AutoModelForCausalLM.from_config(llama_config()).save_pretrained(folder)


def sync_group(store_file: str, rank: int) -> Any:
    """The trainer-to-receiver group of 5 (not the default group: see the docstring)."""
    store = dist.FileStore(store_file, GROUP_SIZE)
    return dist.ProcessGroupGloo(dist.PrefixStore("weight-sync", store), rank, GROUP_SIZE, TIMEOUT)


# ------------------------------------------------------------------ the trainer job


def trainer(folder: str, store_file: str) -> dict[str, Any]:
    """One trainer rank: build the model at TP=2 x PP=2, then sync its weights to the receiver."""
    from bridgegen.engines.distributed import ParallelLayout, build_chunks, load_hf
    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.weight_sync import WeightExport

    rank = dist.get_rank()  # in the trainer job's default group (run_on_ranks made it)
    bridge = ModelBridge.from_hf_dir(folder)
    chunks = build_chunks(bridge, ParallelLayout(tp=2, pp=2), torch.float32)
    load_hf(bridge, chunks, folder)
    group = sync_group(store_file, rank)

    export = WeightExport(bridge, chunks[0].model)  # collective in the trainer job, once
    start = time.perf_counter()
    sent = sent_bytes = 0
    if rank == 0:
        # The manifest (names, shapes, dtypes in yield order) first, as one pickled byte tensor.
        manifest = [(name, tuple(shape), str(dtype)) for name, shape, dtype in export.manifest()]
        payload = torch.frombuffer(bytearray(pickle.dumps(manifest)), dtype=torch.uint8)
        group.send([torch.tensor([payload.numel()], dtype=torch.int64)], RECEIVER, 0).wait()
        group.send([payload], RECEIVER, 0).wait()
    for _name, tensor in export(destinations={0}):  # every trainer rank; only rank 0 yields
        group.send([tensor.contiguous()], RECEIVER, 0).wait()
        sent += 1
        sent_bytes += tensor.nbytes
    seconds = time.perf_counter() - start
    group.barrier().wait()  # all five: the receiver has every tensor
    del group
    return {"rank": rank, "sent": sent, "bytes": sent_bytes, "seconds": seconds}


# ------------------------------------------------------------------ the receiver


def receiver(folder: str, store_file: str, result_file: str) -> None:
    """The inference side: a transformers model of the same config, other random weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(SEED_RECEIVER)
    model = AutoModelForCausalLM.from_config(llama_config()).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(tokens).logits

    group = sync_group(store_file, RECEIVER)
    size = torch.empty(1, dtype=torch.int64)
    group.recv([size], 0, 0).wait()
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    group.recv([payload], 0, 0).wait()
    manifest = pickle.loads(payload.numpy().tobytes())

    # load_weights-style: each received tensor is copied into the parameter of its HF name.
    params = model.state_dict()
    loaded: set[str] = set()
    for name, shape, dtype in manifest:
        buffer = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
        group.recv([buffer], 0, 0).wait()
        target = params[name]
        if target.shape != buffer.shape or target.dtype != buffer.dtype:
            raise ValueError(
                f"{name}: received {list(buffer.shape)} {buffer.dtype}, model has {list(target.shape)} {target.dtype}"
            )
        with torch.no_grad():
            target.copy_(buffer)
        loaded.add(name)
    group.barrier().wait()
    del group
    missing = sorted(set(params) - loaded)

    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        after, expected = model(tokens).logits, source(tokens).logits
    result = {
        "tensors": len(manifest),
        "missing": missing,
        "differed_before": not torch.equal(before, expected),
        "equal": bool(torch.equal(after, expected)) and after.dtype == torch.float32,
        "max_abs_diff": float((after - expected).abs().max()),
    }
    Path(result_file).write_text(json.dumps(result))


# ------------------------------------------------------------------ the job's setup


def main() -> int:
    from bridgegen.engines.launch import run_on_ranks

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="weight-sync-rl-") as scratch:
        folder, store_file, result_file = (str(Path(scratch, n)) for n in ("hf", "store", "result.json"))
        make_source(Path(folder))
        process = multiprocessing.get_context("spawn").Process(
            target=receiver, args=(folder, store_file, result_file), daemon=True
        )
        process.start()
        try:
            ranks = run_on_ranks(trainer, TRAINER_RANKS, folder, store_file)
            process.join(TIMEOUT.total_seconds())
        finally:
            if process.is_alive():
                process.terminate()
                process.join()
        if process.exitcode != 0:
            print(f"weight sync parity: FAILED, the receiver exited with {process.exitcode}", file=sys.stderr)
            return 1
        result = json.loads(Path(result_file).read_text())
    sent = ranks[0]
    ok = (
        result["equal"]
        and result["differed_before"]
        and not result["missing"]
        and sent["sent"] == result["tensors"]
    )
    print(
        f"weight sync parity: {'OK' if ok else 'FAILED'} -- trainer TP=2 x PP=2 (4 gloo ranks) -> receiver (rank 4): "
        f"{sent['sent']} HF tensors, {sent['bytes'] / 2**20:.2f} MiB in {sent['seconds']:.2f} s; receiver logits "
        f"torch.equal HF source logits (fp32): {result['equal']} (max|diff| {result['max_abs_diff']:.1e}, "
        f"before sync differed: {result['differed_before']}, missing: {len(result['missing'])}); "
        f"total {time.perf_counter() - start:.1f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
