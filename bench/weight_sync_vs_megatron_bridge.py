"""Weight sync from a live model: bridgegen's ``WeightExport`` against Megatron-Bridge 0.6.2's
``AutoBridge.export_hf_weights``, on the same megatron-core model, CPU, 2 gloo ranks.

    PYTHONPATH=/tmp/mbpkgs .venv-latest/bin/python bench/weight_sync_vs_megatron_bridge.py
    .venv/bin/python bench/weight_sync_vs_megatron_bridge.py            # bridgegen only (no Megatron-Bridge)

(``/tmp/mbpkgs``: a ``pip install --target`` folder holding megatron-bridge 0.6.2 and what it
needs, transformers 5.12.1 included; Megatron-Bridge runs on CPU with the stand-ins of
tests/data/megatron_checkpoints/make/cpu_compat.py.)

The model: a Qwen3-MoE shape (hidden 256, 4 layers, all MoE, 32 experts of FFN 128, 8 heads /
4 KV heads of 32, vocab 1024, untied), fp32, ~13.9 M parameters (55.7 MB). Every HF element
holds its own number (1, 2, 3, ... in HF order, exact in fp32): a tensor moved to the wrong
place or a wrong element cannot look right, and the elements a rank holds can be told apart.

Per layout (TP=2 with expert-TP 2, then EP=2; 2 ranks), steps 1-4 in the same two processes:

1. The model is built ONCE per layout: with Megatron-Bridge, its own provider (``to_megatron_provider``,
   CPU setup of cpu_compat: local layer spec, fp32, no fusions) and its ``load_hf_weights``;
   without Megatron-Bridge, with bridgegen's ``build_chunks`` + ``load_hf``. Both tools export
   that one model.
2. Time: one warm-up sync each, then ``--repeats`` syncs each, alternating (ours, theirs, ours,
   ...), every rank receiving every tensor (Megatron-Bridge's only mode), each sync's yielded
   tensors consumed and dropped. A sync's time is the slower rank's; the median is reported.
   Both tools plan once and reuse the plan, as an RL loop does: bridgegen's ``WeightExport``
   object, Megatron-Bridge's ``conversion_tasks`` (``get_conversion_tasks``, as NeMo-RL passes
   them); Megatron-Bridge's default call (tasks built in every call) is timed too.
3. Bit-exact: every (name, tensor) of one sync of each tool compared with ``torch.equal`` (and
   dtype / shape), the name sets compared, and both against the HF source.
4. Bytes: every torch.distributed function is wrapped for one sync per mode (here, in this
   bench only) to count calls and the bytes each rank sends and receives (logical: an
   all_gather of s bytes over n ranks sends (n-1)s and receives (n-1)s, a broadcast sends
   (n-1)s from its source and receives s elsewhere, object collectives count pickled bytes).
   The minimum for a mode: a receiving rank must receive each yielded element it does not hold
   (told by the element numbers); with 2 ranks, all that one rank lacks comes from the other, so
   a rank's minimum send is the other rank's minimum receive.
5. Memory, in a second pair of rank processes (the model built again the same way), started
   with glibc's mmap threshold fixed at 4 KiB (MALLOC_MMAP_THRESHOLD_): every tensor is mapped
   when allocated and unmapped when freed, so RSS follows the live bytes (in the timing
   processes, free lists left by earlier syncs would be refilled and counted). Peak RSS
   (VmHWM, reset through /proc/self/clear_refs) above RSS before a sync, after one unmeasured
   sync; the consumer holds nothing. Compared with bucket size + the largest HF tensor
   (bridgegen's default bucket, and the smallest one it accepts: one layer's experts).

Each rank runs torch with 1 thread (2 ranks on 2 cores). Prints markdown tables for
docs/benchmarks.md and the command; ``--json FILE`` writes every rank's raw results,
``--profile`` prints a cProfile of one bridgegen sync on rank 0, ``--ours-only`` (automatic
where ``megatron.bridge`` cannot be found) leaves Megatron-Bridge out. Exit status 1 where a
tensor differs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import pickle
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "tests" / "data" / "megatron_checkpoints" / "make"
sys.path.insert(0, str(ROOT))

WORLD = 2
SHAPE: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,  # unused: every layer is MoE
    "moe_intermediate_size": 128,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "mlp_only_layers": [],
    "decoder_sparse_step": 1,
}
LAYOUTS: dict[str, dict[str, int]] = {"TP=2": {"tp": 2, "ep": 1}, "EP=2": {"tp": 1, "ep": 2}}


def shape_text() -> str:
    s = SHAPE
    return (
        f"Qwen3-MoE shape: hidden {s['hidden_size']}, {s['num_hidden_layers']} MoE layers, "
        f"{s['num_experts']} experts of FFN {s['moe_intermediate_size']}, {s['num_attention_heads']} heads / "
        f"{s['num_key_value_heads']} KV of {s['head_dim']}, vocab {s['vocab_size']}, untied, fp32"
    )


# ------------------------------------------------------------------ the HF source


def hf_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The HF tensors of the model, as Qwen3-MoE checkpoints on the Hub store them (one tensor
    per expert; transformers 5 stacks experts inside its model, but writes this layout)."""
    s = SHAPE
    h, v, e, f, d = (
        s["hidden_size"],
        s["vocab_size"],
        s["num_experts"],
        s["moe_intermediate_size"],
        s["head_dim"],
    )
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "self_attn.q_norm.weight", (d,)),
            (p + "self_attn.k_norm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate.weight", (e, h)),
        ]
        for x in range(e):
            out += [
                (p + f"mlp.experts.{x}.gate_proj.weight", (f, h)),
                (p + f"mlp.experts.{x}.up_proj.weight", (f, h)),
                (p + f"mlp.experts.{x}.down_proj.weight", (h, f)),
            ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_hf(folder: Path) -> dict[str, Any]:
    """config.json + model.safetensors whose elements are 1, 2, 3, ... in HF order (fp32)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**SHAPE)
    config.architectures = ["Qwen3MoeForCausalLM"]  # as save_pretrained of the model writes it
    tensors, start = {}, 1
    for name, shape in hf_shapes():
        count = 1
        for size in shape:
            count *= size
        tensors[name] = torch.arange(start, start + count, dtype=torch.float64).to(torch.float32).view(shape)
        start += count
    if start >= 2**24:
        raise SystemExit(f"{start} elements: not every element number is exact in fp32 (at most 2**24)")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    largest = max(tensors.items(), key=lambda kv: kv[1].nbytes)
    return {
        "elements": start - 1,
        "bytes": sum(t.nbytes for t in tensors.values()),
        "tensors": len(tensors),
        "largest_hf_tensor": (largest[0], largest[1].nbytes),
    }


# ------------------------------------------------------------------ counting collectives (this bench only)

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
    "gather_object",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "barrier",
)


def _pickled(obj: Any) -> int:
    return len(pickle.dumps(obj))


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.nbytes
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return 0


class Counted:
    """Wraps the torch.distributed functions (the package's names, which both tools call) while
    active; internal calls inside torch.distributed are not counted twice."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.calls: dict[str, int] = {}
        self.trivial = 0  # calls on groups of one rank (move nothing)
        self.sent = 0
        self.received = 0
        self.real: dict[str, Callable[..., Any]] = {}

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        dist = self.dist

        def group_of(args: tuple[Any, ...], kwargs: dict[str, Any], position: int) -> Any:
            if "group" in kwargs:
                return kwargs["group"]
            return args[position] if len(args) > position else None

        def counting(*args: Any, **kwargs: Any) -> Any:
            positions = {
                "all_gather": 2,
                "all_gather_into_tensor": 2,
                "all_gather_object": 2,
                "broadcast": 2,
                "broadcast_object_list": 2,
                "all_reduce": 2,
                "barrier": 0,
            }
            group = group_of(args, kwargs, positions.get(name, 99))
            size = dist.get_world_size(group)
            sent = received = 0
            result = real(*args, **kwargs)
            if name == "all_gather":
                sent = _nbytes(args[1] if len(args) > 1 else kwargs["tensor"]) * (size - 1)
                received = sent
            elif name == "all_gather_into_tensor":
                out, inp = (args + (None, None))[:2]
                out = kwargs.get("output_tensor", out)
                inp = kwargs.get("input_tensor", inp)
                sent, received = inp.nbytes * (size - 1), out.nbytes - inp.nbytes
            elif name == "all_gather_object":
                out = args[0] if args else kwargs["object_list"]
                mine = _pickled(args[1] if len(args) > 1 else kwargs["obj"])
                sent, received = mine * (size - 1), sum(_pickled(o) for o in out) - mine
            elif name in ("broadcast", "broadcast_object_list"):
                payload = args[0] if args else kwargs.get("tensor", kwargs.get("object_list"))
                src = kwargs.get("src", args[1] if len(args) > 1 else None)
                if src is None and kwargs.get("group_src") is not None:
                    src = dist.get_global_rank(group, kwargs["group_src"])
                nbytes = _nbytes(payload) if name == "broadcast" else _pickled(payload)
                if src == dist.get_rank():
                    sent = nbytes * (size - 1)
                else:
                    received = nbytes
            elif name == "all_reduce":
                t = args[0] if args else kwargs["tensor"]
                sent = received = 2 * (size - 1) * t.nbytes // size
            elif name in ("send", "isend"):
                sent = _nbytes(args[0] if args else kwargs["tensor"])
            elif name in ("recv", "irecv"):
                received = _nbytes(args[0] if args else kwargs["tensor"])
            if size > 1:
                self.calls[name] = self.calls.get(name, 0) + 1
            else:
                self.trivial += 1
            self.sent += sent
            self.received += received
            return result

        return counting

    def __enter__(self) -> Counted:
        for name in COLLECTIVES:
            real = getattr(self.dist, name, None)
            if real is not None:
                self.real[name] = real
                setattr(self.dist, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, real in self.real.items():
            setattr(self.dist, name, real)

    def result(self) -> dict[str, Any]:
        return {
            "calls": dict(sorted(self.calls.items())),
            "collectives": sum(self.calls.values()),
            "trivial_calls": self.trivial,
            "sent": self.sent,
            "received": self.received,
        }


# ------------------------------------------------------------------ memory

MMAP_THRESHOLD = "4096"  # bytes, for the memory processes (glibc's MALLOC_MMAP_THRESHOLD_)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_extra(run: Callable[[], Any]) -> int:
    """Peak RSS above the RSS before ``run`` (after one unmeasured ``run``)."""
    run()
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    run()
    return _status("VmHWM") - before


# ------------------------------------------------------------------ what each rank runs


def consume(pairs: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs a sync to its end, holding nothing; the yielded bytes."""
    total = 0
    for _, tensor in pairs:
        total += tensor.nbytes
    return total


def build_with_megatron_bridge(hf_dir: str, tp: int, ep: int) -> tuple[list[torch.nn.Module], Any]:
    """Megatron-Bridge's provider and HF load (as mb_import.py, i.e. AutoBridge.import_ckpt's calls)."""
    sys.path.insert(0, str(MAKE))
    import cpu_compat

    cpu_compat.cpu_patches()
    cpu_compat.init_dist(tp=tp, ep=ep)
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider(load_weights=False)
    cpu_compat.make_cpu_provider(provider, tp=tp)
    provider.expert_model_parallel_size = ep
    provider.expert_tensor_parallel_size = (
        tp  # as megatron-core's parallel state (cpu_compat.init_dist) has it
    )
    provider.finalize()
    model = provider.provide_distributed_model(
        wrap_with_ddp=False, use_cpu_initialization=True, fp16=False, bf16=False, mixed_precision_wrapper=None
    )
    bridge.load_hf_weights(model)
    return model, bridge


def build_with_bridgegen(conversion: Any, hf_dir: str, tp: int, ep: int) -> list[torch.nn.Module]:
    from bridgegen.engines.distributed import ParallelLayout, build_chunks, load_hf

    chunks = build_chunks(conversion, ParallelLayout(tp=tp, ep=ep), torch.float32)
    load_hf(conversion, chunks, hf_dir)
    return [chunk.model for chunk in chunks]


def held_mask(models: list[torch.nn.Module], elements: int) -> torch.Tensor:
    """Which element numbers this rank holds."""
    from bridgegen.plan.weight_map import model_tensors

    mask = torch.zeros(elements + 1, dtype=torch.bool)
    for model in models:
        for _, tensor in model_tensors(model):
            tags = tensor.detach().reshape(-1).long()
            mask[tags[(tags > 0) & (tags <= elements)]] = True
    mask[0] = False
    return mask


def missing_bytes(pairs: Iterable[tuple[str, torch.Tensor]], mask: torch.Tensor) -> tuple[int, int]:
    """(bytes yielded, bytes of yielded elements this rank does not hold)."""
    yielded = lacking = 0
    for _, tensor in pairs:
        tags = tensor.detach().reshape(-1).long()
        yielded += tensor.nbytes
        lacking += int((~mask[tags]).sum()) * tensor.element_size()
    return yielded, lacking


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    unequal = [
        n
        for n in a
        if n in b and (a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n]))
    ]
    return {
        "tensors": len(a),
        "unequal": unequal,
        "only_first": sorted(set(a) - set(b)),
        "only_second": sorted(set(b) - set(a)),
        "bit_exact": not unequal and set(a) == set(b),
        "same_order": list(a) == list(b),
    }


def run_layout(name: str, hf_dir: str, info: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from bridgegen.engines.model import ModelBridge
    from bridgegen.engines.weight_sync import WeightExport

    tp, ep = LAYOUTS[name]["tp"], LAYOUTS[name]["ep"]
    rank = dist.get_rank()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    conversion = ModelBridge.from_hf_dir(hf_dir)
    use_mb = options["megatron_bridge"]
    start = time.perf_counter()
    if use_mb:
        models, mb = build_with_megatron_bridge(hf_dir, tp, ep)
        built_by = "Megatron-Bridge provider + load_hf_weights"
    else:
        models, mb = build_with_bridgegen(conversion, hf_dir, tp, ep), None
        built_by = "bridgegen build_chunks + load_hf"
    out: dict[str, Any] = {
        "rank": rank,
        "layout": name,
        "built_by": built_by,
        "build_s": time.perf_counter() - start,
    }
    out["model_bytes_here"] = sum(t.nbytes for m in models for _, t in m.named_parameters())

    start = time.perf_counter()
    export = WeightExport(conversion, models)
    out["ours_plan_s"] = time.perf_counter() - start
    out["bucket_bytes"] = export.bucket_bytes
    tasks = None
    if mb is not None:
        start = time.perf_counter()
        tasks = mb.get_conversion_tasks(models)
        out["theirs_plan_s"] = time.perf_counter() - start

    def ours(**kw: Any) -> Iterable[tuple[str, torch.Tensor]]:
        return export(**kw)

    def theirs(prebuilt: bool = True) -> Iterable[tuple[str, torch.Tensor]]:
        pairs: Iterable[tuple[str, torch.Tensor]] = mb.export_hf_weights(
            models, cpu=False, show_progress=False, conversion_tasks=tasks if prebuilt else None
        )
        return pairs

    if options["phase"] == "memory":
        out["memory"] = memory_use(conversion, models, export, ours, theirs if mb is not None else None)
        return out

    # ---- bit-exact (also the warm-up sync of each)
    source = load_file(str(Path(hf_dir) / "model.safetensors"))
    mine = {n: t.clone() for n, t in ours()}
    checks = {"ours_vs_hf_source": compare(mine, source)}
    if mb is not None:
        yours = {n: t.clone() for n, t in theirs()}
        checks["ours_vs_megatron_bridge"] = compare(mine, yours)
        checks["megatron_bridge_vs_hf_source"] = compare(yours, source)
        del yours
    del mine
    out["checks"] = checks

    # ---- time
    def timed(make: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> float:
        dist.barrier()
        begin = time.perf_counter()
        consume(make())
        return time.perf_counter() - begin

    times: dict[str, list[float]] = {"ours": [], "theirs": [], "theirs_default": [], "ours_with_planning": []}
    for _ in range(options["repeats"]):
        times["ours"].append(timed(ours))
        if mb is not None:
            times["theirs"].append(timed(theirs))
    for _ in range(options["extra_repeats"]):
        times["ours_with_planning"].append(timed(lambda: WeightExport(conversion, models)()))
        if mb is not None:
            times["theirs_default"].append(timed(lambda: theirs(prebuilt=False)))
    out["times"] = times

    if options["profile"]:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile() if rank == 0 else None
        if profiler:
            profiler.enable()
        consume(ours())
        if profiler:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
            out["profile_ours"] = text.getvalue()

    # ---- bytes and collectives per mode
    mask = held_mask(models, info["elements"])
    modes: list[tuple[str, dict[str, Any]]] = [
        ("bridgegen, all ranks receive", {}),
        ("destinations={0}", {"destinations": {0}}),
        ("inference_tp=(0,2) to rank 0", {"destinations": {0}, "inference_tp": (0, 2)}),
        ("inference_tp=(1,2) to rank 0", {"destinations": {0}, "inference_tp": (1, 2)}),
        ("inference_tp=(rank,2), every rank", {"inference_tp": (rank, 2)}),
    ]
    traffic: dict[str, Any] = {}
    for label, kwargs in modes:
        with Counted() as counted:
            pairs = list(ours(**kwargs))
        yielded, lacking = missing_bytes(pairs, mask)
        del pairs
        traffic[label] = {**counted.result(), "yielded": yielded, "min_received": lacking}
    if mb is not None:
        with Counted() as counted:
            pairs = list(theirs())
        yielded, lacking = missing_bytes(pairs, mask)
        del pairs
        traffic["Megatron-Bridge export_hf_weights"] = {
            **counted.result(),
            "yielded": yielded,
            "min_received": lacking,
        }
        with Counted() as counted:
            consume(theirs(prebuilt=False))
        traffic["Megatron-Bridge, tasks built in the call"] = {
            **counted.result(),
            "yielded": None,
            "min_received": lacking,
        }
    out["traffic"] = traffic

    return out


def memory_use(
    conversion: Any,
    models: list[torch.nn.Module],
    export: Any,
    ours: Callable[..., Iterable[tuple[str, torch.Tensor]]],
    theirs: Callable[..., Iterable[tuple[str, torch.Tensor]]] | None,
) -> dict[str, Any]:
    """Peak RSS of a sync above RSS before it, in processes started with glibc's mmap threshold
    fixed at 4 KiB (MALLOC_MMAP_THRESHOLD_): tensors are mapped on allocation and unmapped when
    freed, so RSS follows the live bytes (no free lists of earlier syncs refilled)."""
    from bridgegen.engines.weight_sync import WeightExport

    smallest = None
    try:
        WeightExport(conversion, models, bucket_bytes=1)
    except Exception as exc:  # noqa: BLE001 - the error names the smallest bucket
        smallest = int(str(exc).rpartition(">= ")[2])
    small = WeightExport(conversion, models, bucket_bytes=smallest)
    memory: dict[str, Any] = {"mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    memory["ours_default_bucket"] = {
        "bucket_bytes": export.bucket_bytes,
        "peak": peak_extra(lambda: consume(ours())),
    }
    memory["ours_smallest_bucket"] = {"bucket_bytes": smallest, "peak": peak_extra(lambda: consume(small()))}
    memory["ours_smallest_bucket_destinations_0"] = {
        "bucket_bytes": smallest,
        "peak": peak_extra(lambda: consume(small(destinations={0}))),
    }
    if theirs is not None:
        memory["theirs"] = {"bucket_bytes": None, "peak": peak_extra(lambda: consume(theirs()))}
    return memory


def rank_main(hf_dir: str, info: dict[str, Any], options: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    return [run_layout(name, hf_dir, info, options) for name in options["layouts"]]


# ------------------------------------------------------------------ report


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(info: dict[str, Any], ranks: list[list[dict[str, Any]]], options: dict[str, Any]) -> str:
    lines: list[str] = []
    by_layout = list(zip(*ranks, strict=True))  # per layout: each rank's result
    mb = options["megatron_bridge"]
    lines.append(
        f"Model: {shape_text()}; {info['elements'] / 1e6:.2f} M parameters, {mib(info['bytes'])}, "
        f"{info['tensors']} HF tensors (largest {info['largest_hf_tensor'][0]}, {mib(info['largest_hf_tensor'][1])}). "
        f"2 gloo ranks on CPU, 1 torch thread each; built by {by_layout[0][0]['built_by']}, once per layout, "
        "both tools exporting that model."
    )
    lines.append("")
    lines.append("### Time per sync (every rank receives every tensor)")
    lines.append("")
    head = "| layout | bridgegen WeightExport, s (min-max) |"
    sep = "|---|---|"
    if mb:
        head += " Megatron-Bridge export_hf_weights, s (min-max) | ours / theirs, medians (minimums) | Megatron-Bridge, tasks built per call, s | bridgegen incl. planning, s | all tensors bit-exact |"
        sep += "---|---|---|---|---|"
    else:
        head += " bridgegen incl. planning, s | bit-exact vs HF source |"
        sep += "---|---|"
    lines += [head, sep]
    for results in by_layout:

        def slowest(key: str, results: tuple[dict[str, Any], ...] = results) -> list[float]:
            """Each sync's time: the slower rank's."""
            return [max(r["times"][key][i] for r in results) for i in range(len(results[0]["times"][key]))]

        def cell(values: list[float]) -> str:
            if not values:
                return "-"
            return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"

        ours = slowest("ours")
        row = f"| {results[0]['layout']} | {cell(ours)} |"
        exact = all(r["checks"]["ours_vs_hf_source"]["bit_exact"] for r in results)
        if mb:
            theirs = slowest("theirs")
            exact = exact and all(
                r["checks"]["ours_vs_megatron_bridge"]["bit_exact"]
                and r["checks"]["megatron_bridge_vs_hf_source"]["bit_exact"]
                for r in results
            )
            row += (
                f" {cell(theirs)} | {statistics.median(ours) / statistics.median(theirs):.2f}x"
                f" ({min(ours) / min(theirs):.2f}x) |"
                f" {cell(slowest('theirs_default'))} | {cell(slowest('ours_with_planning'))} |"
                f" {'yes' if exact else 'NO'} ({results[0]['checks']['ours_vs_megatron_bridge']['tensors']} tensors) |"
            )
        else:
            row += f" {cell(slowest('ours_with_planning'))} | {'yes' if exact else 'NO'} |"
        lines.append(row)
    lines.append("")
    lines.append("### Bytes and collectives per sync (rank 0 / rank 1)")
    lines.append("")
    lines.append(
        "Minimum: a receiving rank receives each yielded element it does not hold; with 2 ranks that is what the "
        "other rank must send. Ratio: bytes moved (both ranks' receives) over the minimum."
    )
    lines.append("")
    lines.append(
        "| layout | mode | collectives per sync, each rank | sent, MiB | min sent, MiB | received, MiB | min received, MiB | moved / min |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for results in by_layout:
        for label in results[0]["traffic"]:
            if label.endswith("tasks built in the call"):
                continue  # the same calls and bytes (JSON)
            t = [r["traffic"][label] for r in sorted(results, key=lambda r: r["rank"])]
            min_recv = [x["min_received"] for x in t]  # 0 where a rank yields nothing
            min_sent = [sum(min_recv) - m for m in min_recv]  # 2 ranks: what the other lacks
            calls = {
                f"{x['collectives']} ({', '.join(f'{k} {v}' for k, v in x['calls'].items()) or 'none'})"
                for x in t
            }
            moved, needed = sum(x["received"] for x in t), sum(min_recv)
            shown = (
                f"{moved / needed:.2f}x" if needed else ("-" if moved == 0 else f"{mib(moved)} moved, min 0")
            )

            def pair(values: list[int]) -> str:
                return " / ".join(f"{v / 2**20:.2f}" for v in values)

            lines.append(
                f"| {results[0]['layout']} | {label} | {' / '.join(sorted(calls))} | {pair([x['sent'] for x in t])} | "
                f"{pair(min_sent)} | {pair([x['received'] for x in t])} | {pair(min_recv)} | {shown} |"
            )
    lines.append("")
    if options["memory"]:
        lines.append(
            "### Peak memory per rank during a sync (RSS above the RSS before it; the consumer holds nothing)"
        )
        lines.append("")
        lines.append(
            f"Measured in fresh rank processes with glibc's mmap threshold at {MMAP_THRESHOLD} bytes "
            "(MALLOC_MMAP_THRESHOLD_), so that RSS follows live tensor bytes; one unmeasured sync first."
        )
        lines.append("")
        largest = info["largest_hf_tensor"][1]
        lines.append(
            "| layout | exporter | bucket | rank 0 peak | rank 1 peak | bound: bucket + largest HF tensor | peak / bound (worst rank) |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        names = {
            "ours_default_bucket": "bridgegen, default bucket",
            "ours_smallest_bucket": "bridgegen, smallest bucket",
            "ours_smallest_bucket_destinations_0": "bridgegen, smallest bucket, destinations={0}",
            "theirs": "Megatron-Bridge (no bucket)",
        }
        for results in by_layout:
            for key, what in names.items():
                if key not in results[0]["memory"]:
                    continue
                bucket = results[0]["memory"][key]["bucket_bytes"]
                peaks = [r["memory"][key]["peak"] for r in sorted(results, key=lambda r: r["rank"])]
                bound = None if bucket is None else bucket + largest
                lines.append(
                    f"| {results[0]['layout']} | {what} | {'-' if bucket is None else mib(bucket)} | {mib(peaks[0])} | "
                    f"{mib(peaks[1])} | {'-' if bound is None else mib(bound)} | "
                    f"{'-' if bound is None else f'{max(peaks) / bound:.2f}'} |"
                )
    lines.append("")
    lines.append(
        "Model bytes held per rank: "
        + ", ".join(f"{res[0]['layout']} {mib(res[0]['model_bytes_here'])}" for res in by_layout)
        + f"; default bucket {mib(by_layout[0][0]['bucket_bytes'])}."
    )
    return "\n".join(lines)


def command_line() -> str:
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    python = (
        os.path.relpath(sys.executable, Path.cwd())
        if sys.executable.startswith(str(Path.cwd()))
        else sys.executable
    )
    script = os.path.relpath(__file__, Path.cwd())
    return env + shlex.join([python, script, *sys.argv[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed syncs per tool and layout (after one warm-up)"
    )
    parser.add_argument(
        "--extra-repeats", type=int, default=2, help="timed syncs incl. planning per tool and layout"
    )
    parser.add_argument(
        "--ours-only", action="store_true", help="bridgegen only (automatic without Megatron-Bridge)"
    )
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {list(LAYOUTS)}")
    parser.add_argument("--workdir", help="where the HF source is written (default: a temp folder, removed)")
    parser.add_argument("--json", help="write every rank's results here")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--profile", action="store_true", help="cProfile one bridgegen sync on rank 0")
    args = parser.parse_args()
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}")
    use_mb = not args.ours_only and importlib.util.find_spec("megatron.bridge") is not None
    if not use_mb and not args.ours_only:
        print("Megatron-Bridge is not importable: bridgegen only", file=sys.stderr)
    options = {
        "repeats": args.repeats,
        "extra_repeats": args.extra_repeats,
        "megatron_bridge": use_mb,
        "layouts": layouts,
        "profile": args.profile,
        "memory": not args.no_memory,
    }
    from bridgegen.engines.launch import run_on_ranks

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="weight-sync-bench-") as scratch:
        hf_dir = Path(args.workdir or scratch) / "hf"
        info = make_hf(hf_dir)
        results = run_on_ranks(rank_main, WORLD, str(hf_dir), info, {**options, "phase": "main"})
        if options["memory"]:
            saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
            os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by glibc when each rank starts
            try:
                memory = run_on_ranks(rank_main, WORLD, str(hf_dir), info, {**options, "phase": "memory"})
            finally:
                if saved is None:
                    del os.environ["MALLOC_MMAP_THRESHOLD_"]
                else:
                    os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
            for per_rank, measured in zip(results, memory, strict=True):
                for result, found in zip(per_rank, measured, strict=True):
                    result["memory"] = found["memory"]
    if args.json:
        Path(args.json).write_text(
            json.dumps({"info": info, "options": options, "ranks": results}, indent=1, default=str)
        )
    for per_rank in results[0]:
        if "profile_ours" in per_rank:
            print(
                f"--- cProfile, one bridgegen sync, rank 0, {per_rank['layout']}\n{per_rank['profile_ours']}"
            )
    mismatches = [
        (r["layout"], r["rank"], key, c["unequal"][:5], c["only_first"][:5], c["only_second"][:5])
        for per_rank in results
        for r in per_rank
        for key, c in r["checks"].items()
        if not c["bit_exact"]
    ]
    print(report(info, results, options))
    print()
    print("Mismatches: " + ("none" if not mismatches else json.dumps(mismatches)))
    print(f"Total {time.perf_counter() - started:.0f} s. Command (from the repository root):")
    print(f"    {command_line()}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
