"""Megatron-native checkpoints: what Megatron-LM and Megatron-Bridge load, and reading what they
write.

The fixtures in tests/data/megatron_checkpoints were written by Megatron-Bridge 0.6.2 and by
Megatron-LM's own ``save_checkpoint`` (megatron-core 0.19.2 / 0.20; no ``common.pt``, the common
state inside the DCP files); their README says how. Each is exported here and compared with the
sha256 of its HF source's tensors recorded in its verify.json, never with our own output.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import assert_bit_exact, tensors_of

from bridgegen.cli.main import main
from bridgegen.formats import dist_checkpoint, megatron_lm

FIXTURES = Path(__file__).parent / "data" / "megatron_checkpoints"
VOCAB = 128
pytestmark = pytest.mark.slow


def sha256_of(tensor: torch.Tensor) -> str:
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def assert_matches_verify_json(case: str, exported: Path) -> None:
    """Every tensor of the HF source, by name, dtype, shape and sha256 of its bytes."""
    expected = json.loads((FIXTURES / case / "verify.json").read_text())["hf_tensors"]
    got = tensors_of(exported)
    assert sorted(got) == sorted(expected)
    for name, info in expected.items():
        tensor = got[name]
        assert str(tensor.dtype).removeprefix("torch.") == info["dtype"], name
        assert list(tensor.shape) == info["shape"], name
        assert sha256_of(tensor) == info["sha256"], name


def fixture_intact(case: str) -> None:
    files = json.loads((FIXTURES / case / "verify.json").read_text())["files"]
    for relative, info in files.items():
        path = FIXTURES / case / relative
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], relative


# One command, no hand-made file: a tracker root with --family (config from Megatron-Bridge's
# run_config.yaml or Megatron-LM's args), or with --hf-config.
EXPORTS = {
    "mb-llama": ["--family", "llama"],
    "mb-llama-tp2": ["--family", "llama"],
    "mb-qwen3-moe": ["--family", "qwen3_moe"],
    "mlm-llama-iter": ["--family", "llama"],
    "mb-qwen3": ["--family", "qwen3"],
    "mb-gpt-oss": ["--family", "gpt_oss"],
    "mb-deepseek-v3": ["--family", "deepseek_v3"],
}
# Fields an export from a run config gives back otherwise: DeepSeek-V2 fields the V3 bridge
# writes at their defaults, and Qwen3-MoE's layer_types written out (every layer full
# attention, what transformers assumes when the field is absent). The special tokens' ids come
# from the carried tokenizer (DeepSeek-V3's are 1 / 2, not its config class's 0 / 1).
NOT_IN_RUN_CONFIGS = {
    "mb-deepseek-v3": {"moe_layer_freq", "aux_loss_alpha"},
    "mb-qwen3-moe": {"layer_types"},
}


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_fixture_exports_bit_exact_from_its_tracker_root(case: str, tmp_path: Path) -> None:
    fixture_intact(case)
    out = tmp_path / "hf"
    assert (
        main(["export", "--megatron", str(FIXTURES / case / "megatron"), "--out", str(out), *EXPORTS[case]])
        == 0
    )
    assert_matches_verify_json(case, out)
    # Tokenizer files come from iter_*/tokenizer/, where both tools keep them.
    assert (out / "tokenizer.json").read_bytes() == (FIXTURES / case / "hf" / "tokenizer.json").read_bytes()
    fixture_intact(case)  # read, never written
    if case.startswith("mb-"):
        # The config read from Megatron-Bridge's run_config.yaml (its activations, its nulls, its
        # window pattern and YaRN settings) is the source's, as transformers reads both.
        from transformers import AutoConfig

        source = AutoConfig.from_pretrained(FIXTURES / case / "hf").to_dict()
        exported = AutoConfig.from_pretrained(out).to_dict()
        skip = {"transformers_version", "dtype", "torch_dtype", "_name_or_path"} | NOT_IN_RUN_CONFIGS.get(case, set())
        # Token ids the source config leaves out are taken from the tokenizer, which names them.
        skip |= {k for k in ("bos_token_id", "eos_token_id", "pad_token_id") if source.get(k) is None}
        assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2)  # <s>, </s> of the tokenizer
        # Neither tool keeps a generation config; the export writes the one transformers'
        # save_pretrained writes for the exported config (so generate() stops at its eos).
        generation = json.loads((out / "generation_config.json").read_text())
        assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
        assert generation["_from_model_config"] is True
        assert {k: (source.get(k), exported.get(k)) for k in (set(source) | set(exported)) - skip if source.get(k) != exported.get(k)} == {}


def test_fixture_exports_with_hf_config_and_at_tp2(tmp_path: Path) -> None:
    """--hf-config instead of --family, and the TP=2 Megatron-Bridge fixture read at TP=2."""
    case = FIXTURES / "mb-qwen3-moe"
    out = tmp_path / "moe"
    assert (
        main(
            [
                "export",
                "--megatron",
                str(case / "megatron"),
                "--out",
                str(out),
                "--hf-config",
                str(case / "hf"),
            ]
        )
        == 0
    )
    assert_matches_verify_json("mb-qwen3-moe", out)
    # The exported config is the HF source's, as --hf-config gave it.
    source = json.loads((case / "hf" / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert exported["moe_intermediate_size"] == source["moe_intermediate_size"]
    out2 = tmp_path / "tp2"
    root = FIXTURES / "mb-llama-tp2" / "megatron"
    assert (
        main(["export", "--megatron", str(root), "--out", str(out2), "--family", "llama", "--tp", "2"]) == 0
    )
    assert_matches_verify_json("mb-llama-tp2", out2)


def test_megatron_lm_iteration_folder_and_explicit_iteration(tmp_path: Path) -> None:
    """The iter_0000010 folder itself, and the root with --iteration 10; its optimizer state
    (exp_avg / exp_avg_sq tensors and the optimizer entry of the common state) is never read."""
    root = FIXTURES / "mlm-llama-iter" / "megatron"
    keys = dist_checkpoint.tensor_metadata(root / "iter_0000010")
    assert any(key.startswith("optimizer.state.exp_avg") for key in keys)
    for source, extra in ((root / "iter_0000010", []), (root, ["--iteration", "10"])):
        out = tmp_path / f"hf-{len(extra)}"
        assert (
            main(["export", "--megatron", str(source), "--out", str(out), "--family", "llama", *extra]) == 0
        )
        assert_matches_verify_json("mlm-llama-iter", out)


def test_common_state_of_megatron_lm_is_read_without_common_pt() -> None:
    folder = FIXTURES / "mlm-llama-iter" / "megatron" / "iter_0000010"
    assert not (folder / "common.pt").exists()
    common = dist_checkpoint.read_common_state(folder)
    assert common["iteration"] == 10
    assert common["checkpoint_version"] == 3.0
    assert common["args"].num_layers == 2 and common["args"].padded_vocab_size == VOCAB


def exit_code(argv: list[str]) -> int:
    """The exit code of a refused command: returned by the checks made before any work, or
    the SystemExit of a conversion error."""
    try:
        return main(argv)
    except SystemExit as stopped:
        return int(stopped.code or 0)


def test_export_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "mlm-llama-iter" / "megatron"
    assert exit_code(["export", "--megatron", str(root), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--family" in err and "--hf-config" in err and "args" in err
    assert (
        exit_code(["export", "--megatron", str(root), "--out", str(tmp_path / "b"), "--iteration", "7"]) == 2
    )
    assert "iter_0000007" in capsys.readouterr().err
    assert (
        exit_code(["export", "--megatron", str(root), "--out", str(tmp_path / "c"), "--family", "qwen3"]) == 2
    )
    assert "q_layernorm" in capsys.readouterr().err  # qwen3 asks for q/k norms this llama lacks
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- import


def import_fixture_model(case: str, out: Path, *extra: str) -> Path:
    assert main(["import", "--hf", str(FIXTURES / case / "hf"), "--out", str(out), *extra]) == 0
    return out


def megatron_bridge_keys(case: str) -> dict[str, Any]:
    keys = json.loads((FIXTURES / case / "verify.json").read_text())["megatron_keys"]
    (folder,) = keys.values()
    return {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in folder.items() if v != "bytes"}


def our_keys(folder: Path) -> dict[str, Any]:
    return {
        k: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        for k, (shape, dtype) in dist_checkpoint.tensor_metadata(folder).items()
    }


def assert_loadable_by_megatron_lm(out: Path, hf_dir: Path) -> None:
    """What Megatron-LM's ``--load`` and Megatron-Bridge's ``pretrained_checkpoint`` read from
    any of our imports: the tracker and ``release/`` (checkpointing.py:388-430, :243-246), a
    torch_dist ``metadata.json``, ``checkpoint_version`` 3.0 and ``iteration`` (:2232-2233),
    the content metadata Megatron-LM saves (:560-561), and ``args`` whose fields that
    ``check_checkpoint_args`` (:176-221) compares equal the HF model's."""
    assert (out / megatron_lm.TRACKER_FILE).read_text() == "release"
    assert json.loads((out / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    common = dist_checkpoint.read_common_state(out / "release")
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["content_metadata"] == megatron_lm.CONTENT_METADATA
    args = common["args"]
    config = json.loads((hf_dir / "config.json").read_text())
    config = config.get("text_config", config)
    assert args.num_layers == config["num_hidden_layers"]
    assert args.hidden_size == config["hidden_size"]
    assert args.num_attention_heads == config["num_attention_heads"]
    assert args.add_position_embedding is True
    assert args.padded_vocab_size == config["vocab_size"]
    rows = dist_checkpoint.tensor_metadata(out / "release")["embedding.word_embeddings.weight"][0][0]
    assert rows == args.padded_vocab_size


def test_import_layout_is_what_megatron_lm_loads(tmp_path: Path) -> None:
    """Megatron-LM ``--load OUT``: the tracker holds ``release`` (checkpointing.py:388-430
    ``read_metadata``; ``release`` skips optimizer, RNG and iteration, :2576-2612), the folder is
    ``release/`` (:243-246) with ``metadata.json`` naming torch_dist (``_get_checkpoint_format``,
    :1974-1992; megatron-core ``check_is_distributed_checkpoint``)."""
    out = import_fixture_model("mb-llama", tmp_path / "ckpt")
    assert_loadable_by_megatron_lm(out, FIXTURES / "mb-llama" / "hf")
    found = megatron_lm.find_checkpoint(out)
    assert found.path == out / "release" and found.iteration is None


def test_common_state_has_what_the_loaders_read(tmp_path: Path) -> None:
    """Megatron-LM: ``check_checkpoint_args`` (checkpointing.py:176-221) reads num_layers,
    hidden_size, num_attention_heads and add_position_embedding from ``args``;
    ``load_args_from_checkpoint`` (:2199-2365) needs ``iteration`` and copies the model shape;
    ``checkpoint_version`` must be 3.0 (:2232, :2844). Megatron-Bridge's training loader raises
    "Legacy checkpoint missing 'args' field" without ``args`` and reads its parallel sizes and
    no_save_optim / no_save_rng (Megatron-Bridge training/checkpointing.py:361-381)."""
    out = import_fixture_model("mb-llama", tmp_path / "ckpt")
    common = dist_checkpoint.read_common_state(out / "release")
    assert common["checkpoint_version"] == 3.0
    assert common["iteration"] == 0
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    hf = json.loads((FIXTURES / "mb-llama" / "hf" / "config.json").read_text())
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (
        hf["num_hidden_layers"],
        hf["hidden_size"],
        hf["num_attention_heads"],
    )
    assert args.add_position_embedding is True  # Megatron-LM's default, so a plain --load matches
    assert args.ffn_hidden_size == hf["intermediate_size"] and args.kv_channels == hf["head_dim"]
    assert args.group_query_attention and args.num_query_groups == hf["num_key_value_heads"]
    assert args.swiglu and args.normalization == "RMSNorm" and args.layernorm_epsilon == hf["rms_norm_eps"]
    assert args.untie_embeddings_and_output_weights and not args.add_bias_linear
    assert args.padded_vocab_size == hf["vocab_size"] and args.vocab_size == hf["vocab_size"]
    assert args.max_position_embeddings == hf["max_position_embeddings"]
    assert args.position_embedding_type == "rope" and args.rotary_base == 10000
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 1)
    assert args.no_save_optim and args.no_save_rng and args.transformer_impl == "transformer_engine"
    assert args.ckpt_format == "torch_dist" and args.tokenizer_type == "HuggingFaceTokenizer"
    # The tokenizer where it is now: Megatron-Bridge's reader of Megatron-LM checkpoints builds it
    # from this path (model_load_save.py:374-376); the flags file names it relative to the folder.
    assert Path(args.tokenizer_model) == (out / "hf_side_files").resolve()
    assert "--tokenizer-model CHECKPOINT/hf_side_files" in (out / "megatron_lm_args.txt").read_text()
    assert (out / "hf_side_files" / "tokenizer.json").is_file()


def test_llama_keys_equal_megatron_bridges(tmp_path: Path) -> None:
    """Same HF model in, same keys, shapes and dtypes out as Megatron-Bridge wrote (dense
    layers: the Transformer Engine and local names agree)."""
    for style in ("te", "local"):
        out = import_fixture_model("mb-llama", tmp_path / style, "--key-names", style)
        assert our_keys(out / "release") == megatron_bridge_keys("mb-llama")


def test_qwen3_moe_keys_stacked_and_te_named(tmp_path: Path) -> None:
    """Uniform MoE: stacked keys with a layer and an expert axis, as Megatron-LM
    (--moe-layer-freq 1) and Megatron-Bridge save them; the local spec's names equal the
    Megatron-Bridge fixture (written with the local spec); the Transformer Engine spec keeps a MoE
    layer's pre-MLP norm as ``pre_mlp_layernorm`` (megatron-core
    ``get_gpt_layer_with_transformer_engine_spec``: ``backend.layer_norm() if num_experts``)."""
    local = import_fixture_model("mb-qwen3-moe", tmp_path / "local", "--key-names", "local")
    reference = megatron_bridge_keys("mb-qwen3-moe")
    assert our_keys(local / "release") == reference
    te = import_fixture_model("mb-qwen3-moe", tmp_path / "te")
    assert_loadable_by_megatron_lm(te, FIXTURES / "mb-qwen3-moe" / "hf")
    te_keys = our_keys(te / "release")
    renamed = dict(reference)
    renamed["decoder.layers.pre_mlp_layernorm.weight"] = renamed.pop(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    )
    assert te_keys == renamed
    # Both styles export back bit-exact.
    for folder in (local, te):
        exported = folder.parent / f"{folder.name}-hf"
        assert main(["export", "--megatron", str(folder), "--out", str(exported)]) == 0
        assert_matches_verify_json("mb-qwen3-moe", exported)


def test_megatron_lm_arguments_are_printed_and_saved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = import_fixture_model("mb-qwen3-moe", tmp_path / "ckpt")
    printed = capsys.readouterr().out
    text = (out / "megatron_lm_args.txt").read_text()
    assert text in printed
    for flag in (
        "--num-layers 2",
        "--hidden-size 64",
        "--num-attention-heads 4",
        "--group-query-attention",
        "--num-query-groups 2",
        "--kv-channels 16",
        "--swiglu",
        "--normalization RMSNorm",
        "--norm-epsilon 1e-06",
        "--disable-bias-linear",
        "--qk-layernorm",
        "--untie-embeddings-and-output-weights",
        "--position-embedding-type rope",
        "--rotary-base 10000",
        "--num-experts 4",
        "--moe-layer-freq 1",
        "--moe-router-topk 2",
        "--moe-ffn-hidden-size 32",
        "--padded-vocab-size 128",
        "--transformer-impl transformer_engine",
        "--ckpt-format torch_dist",
        "--load CHECKPOINT",
    ):
        assert flag in text.split(" \\\n") or f"    {flag}" in text.splitlines() or flag in text, flag
    assert "Not in Megatron-LM" not in text
    # Nothing of the machine that imported, and the training length left to the run.
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    assert "--seq-length" not in [line.strip().split(" ")[0] for line in text.splitlines() if not line.startswith("#")]
    assert "#   - --seq-length (the training length; the model takes up to" in text
    common = dist_checkpoint.read_common_state(out / "release")
    saved = [k for k, v in vars(common["args"]).items() if str(tmp_path.resolve()) in str(v)]
    assert saved == ["tokenizer_model"]  # see test_common_state_has_what_the_loaders_read


def megatron_lm_moe_freq(value: object) -> object:
    """What Megatron-LM makes of ``--moe-layer-freq TEXT`` (``moe_freq_type``, arguments.py:327-349
    at d98e8a64): an int, a digit string as an int, or a list expression evaluated under the
    character allowlist of ``_eval_pattern`` (:245-253)."""
    if isinstance(value, int):
        return value
    assert isinstance(value, str)
    if value.isdigit():
        return int(value)
    assert re.fullmatch(r"[,\d\[\]\(\)\+\*]+", value), value
    return eval(value)  # the same allow-listed expression Megatron-LM evaluates


def test_local_key_names_print_the_fusions_megatron_lm_needs_off(tmp_path: Path) -> None:
    """``--transformer-impl local`` without Transformer Engine: Megatron-LM's defaults turn on
    rope fusion (TransformerConfig.__post_init__ raises "apply_rope_fusion is not available")
    and gradient accumulation fusion (ColumnParallelLinear needs apex or TE)."""
    out = import_fixture_model("mb-llama", tmp_path / "ckpt", "--key-names", "local")
    text = (out / "megatron_lm_args.txt").read_text()
    assert "--no-rope-fusion" in text and "--no-gradient-accumulation-fusion" in text
    te = import_fixture_model("mb-llama", tmp_path / "te")
    assert "--no-rope-fusion" not in (te / "megatron_lm_args.txt").read_text()


def test_vocab_padding_is_a_recorded_choice(tmp_path: Path) -> None:
    """Rows = HF vocab by default (Megatron-Bridge: should_pad_vocab false); --vocab-multiple
    pads, records it in args and bridgegen.json, and the export drops the padding again."""
    out = import_fixture_model("mb-llama", tmp_path / "ckpt", "--vocab-multiple", "96")
    keys = our_keys(out / "release")
    assert keys["embedding.word_embeddings.weight"]["shape"] == [192, 64]
    args = dist_checkpoint.read_common_state(out / "release")["args"]
    assert (args.padded_vocab_size, args.make_vocab_size_divisible_by, args.vocab_size) == (192, 96, VOCAB)
    assert "--padded-vocab-size 192" in (out / "megatron_lm_args.txt").read_text()
    exported = tmp_path / "hf"
    assert main(["export", "--megatron", str(out), "--out", str(exported)]) == 0
    assert_matches_verify_json("mb-llama", exported)


def test_export_of_a_trained_checkpoint_beside_the_import(tmp_path: Path) -> None:
    """Training with --load OUT --save OUT adds iter_* folders and moves the tracker: export
    follows it and still finds bridgegen.json and the tokenizer at the root."""
    out = import_fixture_model("mb-llama", tmp_path / "ckpt")
    shutil.copytree(out / "release", out / "iter_0000100")
    (out / megatron_lm.TRACKER_FILE).write_text("100")
    exported = tmp_path / "hf"
    assert main(["export", "--megatron", str(out), "--out", str(exported)]) == 0
    assert_bit_exact(FIXTURES / "mb-llama" / "hf", exported)
    assert (exported / "tokenizer.json").is_file()


def test_deepseek_v3_keys_per_layer_with_te_names(tmp_path: Path) -> None:
    """First dense layer then MoE layers: per-layer keys, as Megatron-LM builds them for a list
    --moe-layer-freq (megatron-core ``TransformerBlock.sharded_state_dict``:
    ``non_homogeneous_layers`` for a list frequency). Transformer Engine MLA spec names
    (megatron-core ``get_gpt_layer_with_transformer_engine_spec``, multi_latent_attention):
    ``input_layernorm`` separate, q / kv norms inside ``linear_q_up_proj`` /
    ``linear_kv_up_proj``, the dense layer's pre-MLP norm inside ``linear_fc1``, the MoE
    layers' separate. Megatron-Bridge's DeepSeek mapping uses the same names
    (models/deepseek/common.py). The args carry the layer pattern and the MLA sizes."""
    import test_mla

    hf, _ = test_mla.build(tmp_path / "hf", "deepseek_v3")
    out = tmp_path / "ckpt"
    assert main(["import", "--hf", str(hf), "--out", str(out)]) == 0
    assert_loadable_by_megatron_lm(out, hf)
    keys = set(our_keys(out / "release"))
    for key in (
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight",
        "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.1.pre_mlp_layernorm.weight",
        "decoder.layers.2.mlp.experts.experts.linear_fc1.weight",
        "decoder.layers.2.mlp.router.expert_bias",
    ):
        assert key in keys, key
    assert not any("q_layernorm" in k or "kv_layernorm" in k for k in keys)
    args = dist_checkpoint.read_common_state(out / "release")["args"]
    assert args.multi_latent_attention and args.q_lora_rank == 32 and args.kv_lora_rank == 16
    # Saved as Megatron-LM's parser makes it: --use-checkpoint-args copies the saved value over
    # the command line's (checkpointing.py:2307) and megatron-core's get_gpt_decoder_layer_specs
    # raises "Invalid moe_layer_freq: <class 'str'>" for anything but an int or a list
    # (gpt_layer_specs.py:659-661). The flag parses to the same list (moe_freq_type).
    assert args.moe_layer_freq == [0, 1, 1] and type(args.moe_layer_freq) is list and args.num_experts == 4
    assert args.moe_router_score_function == "sigmoid" and args.moe_router_enable_expert_bias
    text = (out / "megatron_lm_args.txt").read_text()
    assert '--moe-layer-freq "([0]*1+[1]*2)"' in text and "--multi-latent-attention" in text
    assert megatron_lm_moe_freq("([0]*1+[1]*2)") == args.moe_layer_freq
    exported = tmp_path / "back"
    assert main(["export", "--megatron", str(out), "--out", str(exported)]) == 0
    assert_bit_exact(hf, exported)


def test_gemma3_post_norms_under_megatron_bridge_names(tmp_path: Path) -> None:
    """Gemma 2 / 3 post norms at Megatron-Bridge's names
    (models/gemma/gemma3_bridge.py: ``self_attention.linear_proj.post_layernorm.weight``,
    ``mlp.linear_fc2.post_layernorm.weight``); what Megatron-LM cannot build is listed."""
    import test_gemma

    hf, _ = test_gemma.make_variant(tmp_path / "hf", "gemma3_text")
    out = tmp_path / "ckpt"
    assert main(["import", "--hf", str(hf), "--out", str(out)]) == 0
    assert_loadable_by_megatron_lm(out, hf)
    keys = set(our_keys(out / "release"))
    assert "decoder.layers.self_attention.linear_proj.post_layernorm.weight" in keys
    assert "decoder.layers.mlp.linear_fc2.post_layernorm.weight" in keys
    assert not any("post_self_attn_layernorm" in k or "post_mlp_layernorm" in k for k in keys)
    text = (out / "megatron_lm_args.txt").read_text()
    assert "Not in Megatron-LM" in text
    for quirk in ("post-attention / post-MLP norms", "embedding output scaled by 8.0", "gated gelu_tanh activation"):
        assert quirk in text, quirk
    exported = tmp_path / "back"
    assert main(["export", "--megatron", str(out), "--out", str(exported)]) == 0
    assert_bit_exact(hf, exported)


def test_qwen3_round_trip_through_the_new_layout(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "ckpt"
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    assert_loadable_by_megatron_lm(out, tmp_path / "hf")
    keys = set(our_keys(out / "release"))
    assert {
        "decoder.layers.self_attention.q_layernorm.weight",
        "decoder.layers.self_attention.k_layernorm.weight",
    } <= keys
    assert dist_checkpoint.read_common_state(out / "release")["args"].qk_layernorm
    exported = tmp_path / "back"
    assert main(["export", "--megatron", str(out), "--out", str(exported)]) == 0
    assert_bit_exact(tmp_path / "hf", exported)


@pytest.mark.parametrize(("scalar", "listed"), [(16, False), (24, True)])
def test_a_softmax_scale_is_listed_only_where_megatron_lm_differs(scalar: int, listed: bool) -> None:
    """Megatron-LM has no --softmax-scale (arguments.py:2326) and scales by 1/sqrt(kv_channels)
    (dot_product_attention.py:84-85): Gemma 3's 1/sqrt(query_pre_attn_scalar) is a gap only when
    the scalar is not the head dim."""
    from bridgegen.generated import Gemma3Bridge

    from bridgegen.engines.model import ModelBridge

    config = Gemma3Bridge.example_hf_config() | {"query_pre_attn_scalar": scalar}
    assert config["head_dim"] == 16
    gaps = ModelBridge.from_hf_config(config).megatron_lm_arguments(torch.float32).not_expressible
    assert any(gap.startswith("softmax scale") for gap in gaps) is listed


# What Megatron-Bridge 0.6.2 reads from a Megatron-LM checkpoint's args without a default
# (megatron/bridge/training/model_load_save.py:370-385 ``_call_model_provider``: the tokenizer
# from tokenizer_type / tokenizer_model, the vocab padding; mlm_compat/arguments.py:62-124
# ``_transformer_config_from_args``; mlm_compat/model.py:62-142 ``_gpt_provider`` and :273
# ``_get_model``).
MEGATRON_BRIDGE_READS = (
    "tokenizer_type tokenizer_model make_vocab_size_divisible_by padded_vocab_size multi_latent_attention "
    "heterogeneous_layers_config_path no_persist_layer_norm params_dtype overlap_p2p_comm num_experts "
    "rotary_interleaved decoder_first_pipeline_num_layers decoder_last_pipeline_num_layers fp8_param_gather "
    "swiglu bias_swiglu_fusion bias_gelu_fusion squared_relu init_method_xavier_uniform group_query_attention "
    "num_query_groups config_logger_dir cp_comm_type is_hybrid_model transformer_impl moe_grouped_gemm "
    "qk_layernorm qk_l2_norm normalization mtp_num_layers max_position_embeddings fp16_lm_cross_entropy "
    "untie_embeddings_and_output_weights position_embedding_type rotary_percent rotary_base use_rope_scaling "
    "init_model_with_meta_device bf16 fp16 num_layers hybrid_layer_pattern hybrid_override_pattern "
    "mtp_hybrid_override_pattern spec use_legacy_models"
).split()


@pytest.mark.parametrize("key_names", ["te", "local"])
def test_args_hold_what_megatron_bridges_megatron_lm_reader_reads(key_names: str, tmp_path: Path) -> None:
    """Megatron-Bridge opens a Megatron-LM checkpoint (``load_megatron_model(OUT/release,
    model_type="gpt")``) from its ``args``: every attribute it reads is there (a missing one
    was "'Namespace' object has no attribute 'multi_latent_attention'"); the local spec's args
    turn persist_layer_norm off, which torch's norms refuse (megatron-core torch_norm.py)."""
    out = import_fixture_model("mb-llama", tmp_path / "ckpt", "--key-names", key_names)
    args = vars(dist_checkpoint.read_common_state(out / "release")["args"])
    assert [name for name in MEGATRON_BRIDGE_READS if name not in args] == []
    assert isinstance(args["cp_comm_type"], list | str) and args["tokenizer_model"]
    assert args["no_persist_layer_norm"] is (key_names == "local")


def test_no_rope_layers_are_given_to_megatron_lm() -> None:
    """Layers without RoPE (SmolLM3, EXAONE 4's global layers) are megatron-core's
    ``no_rope_freq``; Megatron-LM takes them as ``--no-rope-freq`` with a list expression
    (``no_rope_freq_type``, arguments.py:304-325 at d98e8a64), saved as the list it evaluates to."""
    import dataclasses

    from bridgegen.generated import LlamaBridge

    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_config(LlamaBridge.example_hf_config())
    values = dict(bridge.config.values, no_rope_freq=[0, 1])
    bridge = dataclasses.replace(bridge, config=dataclasses.replace(bridge.config, values=values))
    args = bridge.megatron_lm_arguments(torch.float32)
    (flag,) = [flag for flag in args.flags if flag.startswith("--no-rope-freq ")]
    # The list expression Megatron-LM evaluates with the allowlist it uses for --moe-layer-freq.
    assert megatron_lm_moe_freq(flag.split(" ", 1)[1].strip("\"'")) == [0, 1]
    assert args.namespace().no_rope_freq == [0, 1]
    plain = ModelBridge.from_hf_config(LlamaBridge.example_hf_config()).megatron_lm_arguments(torch.float32)
    assert plain.namespace().no_rope_freq is None and not any("--no-rope-freq" in f for f in plain.flags)


def test_interleaved_rope_is_given_to_megatron_lm() -> None:
    """Cohere rotates interleaved pairs (megatron-core's ``rotary_interleaved``); Megatron-LM's
    TransformerConfig arguments make it ``--rotary-interleaved`` (arguments.py:2373,
    argument_utils.py:189-191 at d98e8a64), and a checkpoint's value is forced on load
    (checkpointing.py:2286): the saved args must hold it too."""
    import dataclasses

    from bridgegen.generated import LlamaBridge

    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_config(LlamaBridge.example_hf_config())
    plain = bridge.megatron_lm_arguments(torch.float32)
    assert plain.namespace().rotary_interleaved is False and "--rotary-interleaved" not in plain.flags
    values = dict(bridge.config.values, rotary_interleaved=True)
    bridge = dataclasses.replace(bridge, config=dataclasses.replace(bridge.config, values=values))
    args = bridge.megatron_lm_arguments(torch.float32)
    assert args.namespace().rotary_interleaved is True and "--rotary-interleaved" in args.flags
