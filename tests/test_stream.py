"""Import without a model in memory: the checkpoint is the one the model-built path writes (same
keys, shapes, dtypes and bytes, same common state), for every family; memory stays bounded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import FailingOnCall, assert_bit_exact, dist_checkpoint_tensors, tensor_digests

from bridgegen.engines.checkpoint import save_megatron
from bridgegen.engines.model import ModelBridge
from bridgegen.engines.stream_import import stream_import
from bridgegen.formats import dist_checkpoint

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "data" / "megatron_checkpoints"


def dense(family: str, tied: bool = False, dtype: torch.dtype = torch.float32) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        import test_weights
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(test_weights.hf_config(family, tie_word_embeddings=tied))
        test_weights.randomize(model, seed=3)
        model.to(dtype).save_pretrained(folder)
        return folder

    return make


def deepseek_with_mtp(folder: Path) -> Path:
    import test_mla

    test_mla.build(folder, "deepseek_v3")
    test_mla.with_mtp_layer(folder)
    return folder


def gemma3(folder: Path) -> Path:
    import test_gemma

    return test_gemma.make_variant(folder, "gemma3_text")[0]


def gemma3_multimodal(folder: Path) -> Path:
    import test_gemma

    return test_gemma.make_multimodal(folder, tied=False)[0]


def qwen3_moe(folder: Path) -> Path:
    import test_moe

    return test_moe.make_qwen3_moe(folder)


def fp8_deepseek(folder: Path) -> Path:
    import test_fp8

    return test_fp8.quantized_deepseek(folder)


MODELS: dict[str, Callable[[Path], Path]] = {
    "llama": dense("llama"),
    "llama-tied-bf16": dense("llama", tied=True, dtype=torch.bfloat16),
    "qwen2": dense("qwen2"),
    "qwen3": dense("qwen3"),
    "mistral": dense("mistral"),
    "phi3": dense("phi3"),
    "qwen3_moe": qwen3_moe,
    "deepseek_v3_mtp": deepseek_with_mtp,
    "gemma3": gemma3,
    "gemma3_multimodal": gemma3_multimodal,
}


def model_built_import(hf: Path, out: Path) -> None:
    bridge = ModelBridge.from_hf_dir(hf)
    dtype = bridge.default_dtype()
    model = bridge.build_model(dtype)
    bridge.load_hf_weights(model)
    save_megatron(model, bridge, out, dtype=dtype, hf_source=hf)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_streaming_import_equals_the_model_built_one(name: str, tmp_path: Path) -> None:
    hf = MODELS[name](tmp_path / "hf")
    built, streamed = tmp_path / "built", tmp_path / "streamed"
    model_built_import(hf, built)
    bridge = ModelBridge.from_hf_dir(hf)
    stats = stream_import(bridge, hf, streamed, dtype=bridge.default_dtype())
    a, b = dist_checkpoint_tensors(built / "release"), dist_checkpoint_tensors(streamed / "release")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key
    common_a = dist_checkpoint.read_common_state(built / "release")
    common_b = dist_checkpoint.read_common_state(streamed / "release")
    assert vars(common_a.pop("args")) == vars(common_b.pop("args"))
    assert common_a == common_b
    assert sorted(p.name for p in built.iterdir()) == sorted(p.name for p in streamed.iterdir())
    assert stats.tensors > 0
    exported = tmp_path / "exported"
    from bridgegen.cli.main import main

    assert main(["export", "--megatron", str(streamed), "--out", str(exported)]) == 0
    assert_bit_exact(hf, exported)


def test_streaming_import_of_a_megatron_bridge_fixture_has_its_keys(tmp_path: Path) -> None:
    """The Megatron-Bridge fixture's HF model, streamed with local names: the keys, shapes and
    bytes Megatron-Bridge wrote."""
    case = FIXTURES / "mb-qwen3-moe"
    bridge = ModelBridge.from_hf_dir(case / "hf")
    from bridgegen.formats.key_names import KeyNames

    bridge = bridge.__class__(bridge.bridge, bridge.config, bridge.hf_dir, key_names=KeyNames.local)
    stream_import(bridge, case / "hf", tmp_path / "out", dtype=torch.float32)
    ours = dist_checkpoint_tensors(tmp_path / "out" / "release")
    theirs = dist_checkpoint_tensors(case / "megatron" / "iter_0000000")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# ------------------------------------------------------------------------- memory

MEMORY_SCRIPT = """
import json, resource, sys, torch
from pathlib import Path
from bridgegen.engines.model import ModelBridge
from bridgegen.engines.stream_import import stream_import
import bridgegen.engines.stream_import  # megatron-core and torch imported before the baseline
import megatron.core.models.gpt.gpt_model
from bridgegen.engines.stream_export import stream_export
import megatron.core.dist_checkpointing.strategies.torch
import torch.distributed.checkpoint
what, source, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
bridge = ModelBridge.from_hf_dir(source) if what == "import" else None
import threading, time
def anonymous():
    fields = dict(l.split(':') for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssShmem')))
    return sum(int(v.split()[0]) for v in fields.values()) * 1024
base = anonymous()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
if what == "import":
    stream_import(bridge, source, out, dtype=torch.float32)
else:
    stream_export(source, out, batch_bytes=32 * 2**20)
done.set()
sampler.join()
print(json.dumps({"base": base, "peak": peak[0], "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def peak_growth(what: str, source: Path, out: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, what, str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return int(report["peak"] - report["base"])


def big_llama(folder: Path) -> tuple[Path, int, int]:
    """A llama of 800 MiB in fp32 whose largest tensor is 16 MiB, written layer by layer."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    layers, hidden, ffn, vocab = 16, 1024, 2816, 4096
    config = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        max_position_embeddings=256,
    )
    folder.mkdir()
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    total, largest = 0, 0
    shards: dict[str, str] = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes = {
            "self_attn.q_proj.weight": (hidden, hidden),
            "self_attn.k_proj.weight": (hidden, hidden),
            "self_attn.v_proj.weight": (hidden, hidden),
            "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (ffn, hidden),
            "mlp.up_proj.weight": (ffn, hidden),
            "mlp.down_proj.weight": (hidden, ffn),
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
        }
        tensors = {prefix + k: torch.randn(s, generator=generator) for k, s in shapes.items()}
        file = f"model-{layer:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        shards.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 4 for t in tensors.values())
        largest = max(largest, *(t.numel() * 4 for t in tensors.values()))
    rest = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator),
        "lm_head.weight": torch.randn(vocab, hidden, generator=generator),
        "model.norm.weight": torch.randn(hidden, generator=generator),
    }
    save_file(rest, str(folder / "model-rest.safetensors"), metadata={"format": "pt"})
    shards.update(dict.fromkeys(rest, "model-rest.safetensors"))
    total += sum(t.numel() * 4 for t in rest.values())
    largest = max(largest, *(t.numel() * 4 for t in rest.values()))
    index = {"metadata": {"total_size": total}, "weight_map": shards}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, total, largest


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied after the test whatever its outcome (a failed test's folder is
    otherwise kept), for a test that writes hundreds of MiB; it fails at once, saying so, where
    the disk has less than ``SCRATCH_BYTES`` free."""
    free = shutil.disk_usage(tmp_path).free
    if free < SCRATCH_BYTES:
        pytest.fail(f"{tmp_path}: this test writes {SCRATCH_BYTES / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free")
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


SCRATCH_BYTES = 2 * 2**30


def test_streaming_memory_is_bounded_by_a_buffer_not_the_model(scratch: Path) -> None:
    """Peak memory above the process's own (torch + megatron-core imported) stays far below the
    model's size, for the import and for the export (32 MiB batches): a model-built conversion
    needs the whole model (800 MiB, over 3x the bound) on top. Memory is the process's own
    (anonymous) memory, sampled every 2 ms: the mapped checkpoint's resident pages are page
    cache, reclaimable, and their share of RSS swings with the machine's load (the total under a
    hard limit, page cache included, is bench/memory_limit.sh's). Two of the three 800 MiB
    folders are on disk at a time: the HF source is compared by digest once imported."""
    hf, total, largest = big_llama(scratch / "hf")
    # One parameter at a time (the largest, fused fc1, is 23 MiB), views of the mapped sources
    # up to 512 MiB ahead but new tensors (the fused QKV, 12 MiB) 64 MiB at most, and the
    # writer's copy: import ~90 MiB measured, export ~110 MiB.
    budget = 256 * 2**20
    assert total > 3 * budget, total
    grown = peak_growth("import", hf, scratch / "megatron")
    assert grown < budget, f"import: peak grew {grown / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"
    keys = dist_checkpoint.tensor_metadata(scratch / "megatron" / "release")
    assert keys["decoder.layers.mlp.linear_fc1.weight"][0] == (16, 2 * 2816, 1024)
    expected = tensor_digests(hf)
    shutil.rmtree(hf)
    grown = peak_growth("export", scratch / "megatron", scratch / "back")
    assert grown < budget, f"export: peak grew {grown / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"
    assert tensor_digests(scratch / "back") == expected


def test_two_workers_split_the_import_and_write_the_same_checkpoint(tmp_path: Path) -> None:
    """--workers 2: two local processes, each writing its own file with about half the bytes;
    the checkpoint holds the same tensors as one process writes."""
    from bridgegen.cli.main import main

    hf = qwen3_moe(tmp_path / "hf")
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "one")]) == 0
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    files = sorted((tmp_path / "two" / "release").glob("*.distcp"))
    assert [f.name for f in files] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [f.stat().st_size for f in files]
    assert 0.4 < sizes[0] / sum(sizes) < 0.6, sizes
    a = dist_checkpoint_tensors(tmp_path / "one" / "release")
    b = dist_checkpoint_tensors(tmp_path / "two" / "release")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert main(["export", "--megatron", str(tmp_path / "two"), "--out", str(tmp_path / "back")]) == 0
    assert_bit_exact(hf, tmp_path / "back")


def test_a_worker_count_below_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bridgegen.cli.main import main

    hf = FIXTURES / "mb-llama" / "hf"
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), "--tp", "-1"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["qwen3_moe", "gemma3_multimodal", "deepseek_v3_mtp"])
def test_two_workers_split_the_export(name: str, tmp_path: Path) -> None:
    """--workers 2 on an export: the same folder as one process writes (every tensor, the
    carried vision tower, the MTP copies), each worker converting about half of the bytes."""
    from bridgegen.cli.main import main
    from bridgegen.engines.stream_export import owned_parameters
    from bridgegen.megatron.build import meta_model

    hf = MODELS[name](tmp_path / "hf")
    assert main(["import", "--hf", str(hf), "--out", str(tmp_path / "megatron")]) == 0
    assert (
        main(
            [
                "export",
                "--megatron",
                str(tmp_path / "megatron"),
                "--out",
                str(tmp_path / "two"),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert_bit_exact(hf, tmp_path / "two")
    bridge = ModelBridge.from_hf_dir(hf)
    model = meta_model(bridge, bridge.default_dtype())
    shares = [owned_parameters(bridge, model, rank, 2) for rank in range(2)]
    assert shares[0].isdisjoint(shares[1])
    sizes = dict(
        (n, t.numel() * t.element_size())
        for n, t in model.state_dict(keep_vars=True).items()
        if t is not None
    )
    halves = [sum(sizes.get(n, 0) for n in share) for share in shares]
    assert 0.3 < halves[0] / sum(halves) < 0.7, halves


@pytest.mark.parametrize(("made_ahead", "most"), [(0, 1), (2**30, 15)])
def test_new_tensors_made_ahead_of_the_writer_are_bounded(
    made_ahead: int, most: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors the read-ahead makes (here every one: fp32 sources cast to bf16) are asked for
    ``MADE_AHEAD_BYTES`` at most ahead of the writer, one parameter whatever its size: at 0, one
    at a time; unbounded, all of them at once (the 512 MiB of views do not bound them
    here). Counted where they are asked for, not where they are made: the thread's pace varies."""
    import bridgegen.engines.stream_import as stream

    hf = dense("llama")(tmp_path / "hf")
    queued: list[int] = []
    make_ahead = stream.TensorProducer._make_ahead

    def counted(producer: stream.TensorProducer, name: str) -> None:
        make_ahead(producer, name)
        queued.append(sum(1 for n in producer._ahead if producer._made_bytes(n)))

    monkeypatch.setattr(stream.TensorProducer, "_make_ahead", counted)
    monkeypatch.setattr(stream, "MADE_AHEAD_BYTES", made_ahead)
    stream_import(ModelBridge.from_hf_dir(hf), hf, tmp_path / "out", dtype=torch.bfloat16)
    assert max(queued) == most, queued


# ------------------------------------------------------------------ failures mid-way


def read_ahead_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("bridgegen-read-ahead")]


def test_a_failure_while_making_a_tensor_ahead_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor made in the read-ahead thread fails: the import raises that error, leaves no
    checkpoint and no temp folder, and no thread behind."""
    import bridgegen.engines.stream_import as stream

    hf = dense("llama")(tmp_path / "hf")
    failing = FailingOnCall(stream.read_source_rows, 5, RuntimeError("injected: the fifth tensor cannot be made"))
    monkeypatch.setattr(stream, "read_source_rows", failing)
    out = tmp_path / "megatron"
    with pytest.raises(RuntimeError, match="the fifth tensor cannot be made"):
        stream_import(ModelBridge.from_hf_dir(hf), hf, out, dtype=torch.float32)
    assert failing.calls == 5
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert read_ahead_threads() == []


def test_a_failure_while_reading_a_batch_ahead_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint batch read in a read-ahead thread fails: the export raises that error,
    leaves no HF folder and no temp folder, and no thread behind."""
    import bridgegen.engines.checkpoint_read as stream
    from bridgegen.engines.checkpoint_read import BATCHES_AHEAD
    from bridgegen.engines.stream_export import stream_export

    hf = dense("llama")(tmp_path / "hf")
    megatron = tmp_path / "megatron"
    stream_import(ModelBridge.from_hf_dir(hf), hf, megatron, dtype=torch.float32)
    # Called once per parameter, i.e. once per batch of one parameter (batch_bytes=1).
    failing = FailingOnCall(stream._whole_item, 3, RuntimeError("injected: the third batch cannot be read"))
    monkeypatch.setattr(stream, "_whole_item", failing)
    out = tmp_path / "exported"
    with pytest.raises(RuntimeError, match="the third batch cannot be read"):
        stream_export(megatron, out, batch_bytes=1)
    # Batches being read beside the third (BATCHES_AHEAD in flight) finish; none starts after.
    assert 3 <= failing.calls <= 2 + BATCHES_AHEAD
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "megatron"]
    assert read_ahead_threads() == []


def test_a_piece_of_a_parameter_held_as_row_blocks_is_a_view_of_its_block() -> None:
    """A checkpoint item of a parameter the import writes from its sources' rows (the gate and
    the up half of a stacked fc1): an item lying in one block is a view of that block, one
    spanning two blocks is put together; either way the bytes ``Piece.of`` gives of the whole
    parameter."""
    from bridgegen.engines.pieces import Piece

    gate, up = torch.arange(12.0).view(3, 4), torch.arange(100.0, 112.0).view(3, 4)
    whole = torch.cat([gate, up])

    def piece(first_row: int, rows: int) -> Piece:
        view = whole[first_row : first_row + rows]
        return Piece("fc1", (first_row, 0), (1, rows, 4), "fc1", tuple(view.shape), view.stride(), view.storage_offset())

    in_up = piece(3, 3).of_rows([gate, up])
    assert in_up.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(in_up, piece(3, 3).of(whole))
    across = piece(2, 2).of_rows([gate, up])
    assert torch.equal(across, piece(2, 2).of(whole))
    column = whole[:, 1:3]
    strided = Piece("fc1", (0, 1), (6, 2), "fc1", tuple(column.shape), column.stride(), column.storage_offset())
    assert torch.equal(strided.of_rows([gate, up]), strided.of(whole))
