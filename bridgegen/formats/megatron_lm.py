"""Megatron-LM's checkpoint layout and arguments.

Facts this module is written against (NVIDIA/Megatron-LM ``megatron/training/checkpointing.py``
and ``arguments.py`` at d98e8a64):

- ``--load DIR`` reads ``DIR/latest_checkpointed_iteration.txt``: an integer or ``release``
  (``read_metadata``, checkpointing.py:388-430). Without it Megatron-LM prints a warning and
  trains from random weights (checkpointing.py:2050-2053).
- The checkpoint lives in ``DIR/release/`` or ``DIR/iter_%07d/`` (checkpointing.py:243-246);
  ``metadata.json`` there marks it torch_dist (``check_is_distributed_checkpoint``).
- ``release`` loads without optimizer, RNG or iteration, with no extra flag
  (checkpointing.py:2576, 2612, 2852, 2958, 3071): the right folder for a converted model.
- The common state holds ``args`` (an ``argparse.Namespace``), ``checkpoint_version`` 3.0,
  ``iteration`` (read bare by ``--use-checkpoint-args``, checkpointing.py:2233) and
  ``content_metadata``. A plain ``--load`` compares ``num_layers``, ``hidden_size``,
  ``num_attention_heads`` and ``add_position_embedding`` of ``args`` with its own
  (``check_checkpoint_args``, checkpointing.py:176-221).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bridgegen.bridge.config import MegatronConfig
from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.module_parameters import ModuleParameters
from bridgegen.formats.folders import TRACKER_LIMIT, read_small_text
from bridgegen.plan.conversion import Conversion, KeyNames

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
# What Megatron-LM and Megatron-Bridge save as content metadata and pass to the model's
# sharded_state_dict (checkpointing.py:560-561): stacked layers and experts.
CONTENT_METADATA: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# Megatron-LM names the model's entry `model`, or `model0`, `model1`, ... with virtual stages.
ITERATION_PATTERN = re.compile(r"^iter_(\d{7})$")

def folder_name(iteration: int | None) -> str:
    """``release`` for a converted model, ``iter_0000010`` for iteration 10."""
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


@dataclass(frozen=True)
class CheckpointFolder:
    """Where a Megatron checkpoint's tensors are, and the root it was found under."""

    root: Path
    path: Path
    iteration: int | None  # None: release, or a flat folder with no tracker


def find_checkpoint(path: str | os.PathLike[str], iteration: str | None = None) -> CheckpointFolder:
    """The checkpoint folder that Megatron-LM's ``--load`` would read, given a tracker root
    (latest iteration, or ``iteration``: a number or ``release``), an ``iter_*`` / ``release``
    folder, or a flat folder holding ``metadata.json``."""
    root = Path(path)
    if not root.is_dir():
        raise WeightError(f"{root}: no such checkpoint folder")
    tracker = root / TRACKER_FILE
    if iteration is None and (root / "metadata.json").is_file():
        match = ITERATION_PATTERN.match(root.name)
        return CheckpointFolder(root.parent, root, int(match.group(1)) if match else None)
    if iteration is not None:
        chosen = RELEASE if iteration == RELEASE else folder_name(_iteration_number(iteration, root))
    elif tracker.is_file():
        text = read_small_text(tracker, TRACKER_LIMIT, "tracker file").strip()
        chosen = RELEASE if text == RELEASE else folder_name(_iteration_number(text, tracker))
    else:
        found = sorted(p.name for p in root.iterdir() if ITERATION_PATTERN.match(p.name) or p.name == RELEASE)
        raise WeightError(
            f"{root}: neither {TRACKER_FILE} nor metadata.json"
            + (f"; it holds {', '.join(found)}: pass --iteration or the folder itself" if found else "")
        )
    folder = root / chosen
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if ITERATION_PATTERN.match(p.name) or p.name == RELEASE)
        raise WeightError(
            f"{folder}: no such checkpoint folder"
            + (f"; {root} holds {', '.join(present)}" if present else f"; {root} holds no checkpoint folder")
        )
    if not (folder / "metadata.json").is_file():
        raise WeightError(f"{folder}: not a torch_dist checkpoint folder (no metadata.json)")
    number = None if chosen == RELEASE else int(chosen.removeprefix("iter_"))
    return CheckpointFolder(root, folder, number)


def _iteration_number(text: str, where: Path) -> int:
    try:
        number = int(text)
    except ValueError:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise WeightError(f"{where}: {shown!r} is neither an iteration number nor 'release'") from None
    if number < 0:
        raise WeightError(f"{where}: iteration {number} is negative")
    return number


def write_tracker(root: Path) -> None:
    """Point Megatron-LM's ``--load`` at ``release/``."""
    (root / TRACKER_FILE).write_text(RELEASE)


# ------------------------------------------------------------------------ arguments


@dataclass
class LmArguments:
    """Megatron-LM arguments for one model: the ``args`` namespace values saved in the
    checkpoint, the command-line flags that build the same model, and what no flag can say."""

    values: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    not_expressible: list[str] = field(default_factory=list)
    # What the user sets for a run (not the model's): said in the flags file.
    for_the_run: list[str] = field(default_factory=list)

    def value(self, dest: str, value: Any, flag: str | None = None) -> None:
        self.values[dest] = value
        if flag is not None and value is not None:
            self.flags.append(f"{flag} {_flag_text(value)}")

    def layer_pattern(self, dest: str, pattern: int | list[int], flag: str) -> None:
        """A per-layer pattern (``--moe-layer-freq``): saved as Megatron-LM's parser makes it, an
        int or a list of ints (``moe_freq_type``, arguments.py:327-349; a string in the saved
        args fails megatron-core's ``get_gpt_decoder_layer_specs``, gpt_layer_specs.py:659),
        and given on the command line as a list expression."""
        self.values[dest] = pattern if isinstance(pattern, int) else [int(item) for item in pattern]
        self.flags.append(f"{flag} {_flag_text(_layer_freq_text(pattern))}")

    def switch(self, dest: str, on: bool, flag: str | None) -> None:
        """A store_true argument (``flag`` printed when on)."""
        self.values[dest] = on
        if on and flag is not None:
            self.flags.append(flag)

    def namespace(self) -> argparse.Namespace:
        return argparse.Namespace(**self.values)

    def command_text(self) -> str:
        """The flags file: paths as ``CHECKPOINT`` (wherever the folder lies when training),
        the model's flags, what a run sets for itself, and what no flag can say."""
        lines = [f"--load {CHECKPOINT}", *self.flags]
        text = (
            f"# Megatron-LM flags that build the model of this checkpoint. {CHECKPOINT} is the folder holding\n"
            "# this file: replace it with where the folder lies on the machine that trains.\n"
        )
        text += " \\\n".join(f"    {line}" for line in lines) + "\n"
        if self.for_the_run:
            text += "# Set for your run (not part of the model):\n"
            text += "\n".join(f"#   - {item}" for item in self.for_the_run) + "\n"
        if self.not_expressible:
            text += "\n# Not in Megatron-LM (a model built from these flags lacks it):\n"
            text += "\n".join(f"#   - {item}" for item in self.not_expressible) + "\n"
        return text


def _flag_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and any(c in value for c in "[]()* "):
        return f'"{value}"'
    return str(value)


def _int_if_integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Megatron-LM's defaults (arguments.py at d98e8a64) of the args Megatron-Bridge reads without a
# default of its own.
MEGATRON_BRIDGE_READS: dict[str, Any] = {
    "multi_latent_attention": False,
    "heterogeneous_layers_config_path": None,
    "no_persist_layer_norm": False,
    "overlap_p2p_comm": False,
    "decoder_first_pipeline_num_layers": None,
    "decoder_last_pipeline_num_layers": None,
    "fp8_param_gather": False,
    "bias_swiglu_fusion": False,
    "bias_gelu_fusion": False,
    "init_method_xavier_uniform": False,
    "config_logger_dir": "",
    "cp_comm_type": ["p2p"],
    "is_hybrid_model": False,
    "qk_l2_norm": False,
    "fp16_lm_cross_entropy": False,
    "use_rope_scaling": False,
    "moe_grouped_gemm": False,
    "num_experts": None,
    "init_model_with_meta_device": False,
    "hybrid_layer_pattern": None,
    "hybrid_override_pattern": None,
    "mtp_hybrid_override_pattern": None,
    "spec": None,
    "use_legacy_models": False,
}

# The checkpoint folder in the flags file, wherever it lies when training.
CHECKPOINT = "CHECKPOINT"


def _layer_freq_text(freq: Any) -> int | str:
    """``--moe-layer-freq`` / ``--window-attn-skip-freq``: an int, or a list expression."""
    if isinstance(freq, int):
        return freq
    values = list(freq)
    runs: list[tuple[int, int]] = []
    for item in values:
        if runs and runs[-1][0] == item:
            runs[-1] = (item, runs[-1][1] + 1)
        else:
            runs.append((int(item), 1))
    return "(" + "+".join(f"[{item}]*{count}" for item, count in runs) + ")"


def arguments_for(conversion: Conversion, dtype: torch.dtype, tokenizer_model: str | None = None) -> LmArguments:
    """Megatron-LM's arguments for the model of ``conversion``, its weights in ``dtype``."""
    return lm_arguments(
        conversion.config,
        padded_vocab_size=conversion.config.padded_vocab_size(),
        vocab_multiple=conversion.config.vocab_multiple,
        key_names=conversion.key_names,
        dtype=dtype,
        tokenizer_model=tokenizer_model,
        runtime_modules=conversion.runtime_modules(),
    )


def lm_arguments(
    config: MegatronConfig,
    *,
    padded_vocab_size: int,
    vocab_multiple: int,
    key_names: KeyNames,
    dtype: torch.dtype,
    tokenizer_model: str | None,
    runtime_modules: list[ModuleParameters],
) -> LmArguments:
    """The Megatron-LM arguments of ``config``, from the bridge's Megatron-side values."""
    v = config.values
    args = LmArguments()
    heads = int(v["num_attention_heads"])
    groups = int(v.get("num_query_groups") or heads)
    args.value("num_layers", int(v["num_layers"]), "--num-layers")
    args.value("hidden_size", int(v["hidden_size"]), "--hidden-size")
    args.value("ffn_hidden_size", int(v["ffn_hidden_size"]), "--ffn-hidden-size")
    args.value("num_attention_heads", heads, "--num-attention-heads")
    args.switch("group_query_attention", groups != heads, "--group-query-attention")
    args.value("num_query_groups", groups, "--num-query-groups" if groups != heads else None)
    args.value("kv_channels", v.get("kv_channels"), "--kv-channels")
    max_positions = int(v["max_sequence_length"])
    args.value("max_position_embeddings", max_positions, "--max-position-embeddings")
    # Saved (load_args_from_checkpoint copies it when the command line has none); the training
    # length is the run's to choose.
    args.value("seq_length", min(max_positions, 4096))
    args.for_the_run.append(
        f"--seq-length (the training length; the model takes up to {max_positions} positions), batch sizes, "
        "learning rate and schedule, --train-iters, --save, parallel sizes"
    )
    args.value("add_position_embedding", True)  # the default; a rope model ignores it
    _normalization(args, config)
    _activation(args, config)
    args.switch("add_bias_linear", bool(v.get("add_bias_linear", False)), None)
    if not args.values["add_bias_linear"]:
        args.flags.append("--disable-bias-linear")
    args.switch("add_qkv_bias", bool(v.get("add_qkv_bias", False)), "--add-qkv-bias")
    args.switch("qk_layernorm", bool(v.get("qk_layernorm", False)), "--qk-layernorm")
    args.switch(
        "untie_embeddings_and_output_weights",
        not v.get("share_embeddings_and_output_weights", False),
        "--untie-embeddings-and-output-weights",
    )
    args.value("attention_dropout", float(v.get("attention_dropout") or 0.0), "--attention-dropout")
    args.value("hidden_dropout", float(v.get("hidden_dropout") or 0.0), "--hidden-dropout")
    _rope(args, config)
    if v.get("window_size"):
        args.value("window_size", tuple(int(x) for x in v["window_size"]), "--window-size")
        skip = v.get("window_attn_skip_freq")
        if skip:
            args.layer_pattern("window_attn_skip_freq", skip, "--window-attn-skip-freq")
        else:
            args.value("window_attn_skip_freq", None)
    no_rope = v.get("no_rope_freq")
    if no_rope:
        # no_rope_freq_type (arguments.py:304-325 at d98e8a64): an int or a list expression.
        args.layer_pattern("no_rope_freq", no_rope, "--no-rope-freq")
    else:
        args.value("no_rope_freq", None)
    _moe(args, config)
    _latent_attention(args, config)
    args.value("mtp_num_layers", v.get("mtp_num_layers") or None, "--mtp-num-layers")
    args.value("vocab_size", config.vocab_size)
    args.value("make_vocab_size_divisible_by", vocab_multiple, "--make-vocab-size-divisible-by")
    args.value("padded_vocab_size", padded_vocab_size, "--padded-vocab-size")
    args.value("tokenizer_type", "HuggingFaceTokenizer" if tokenizer_model else None, "--tokenizer-type")
    # Saved as the path it has now: Megatron-Bridge's reader of Megatron-LM checkpoints builds
    # the tokenizer from it (model_load_save.py:374-376), as Megatron-LM's --use-checkpoint-args
    # does (checkpointing.py:2344-2349). The flags file names it relative to the checkpoint.
    args.values["tokenizer_model"] = tokenizer_model
    if tokenizer_model is not None:
        args.flags.append(f"--tokenizer-model {CHECKPOINT}/{Path(tokenizer_model).name}")
        args.for_the_run.append(
            "--tokenizer-model: the saved args name the tokenizer where this folder was written; once "
            "it moves, --use-checkpoint-args takes that path unless told to use the command line's"
        )
    impl = "transformer_engine" if key_names is KeyNames.te else "local"
    args.value("transformer_impl", impl, "--transformer-impl")
    if impl == "local":
        # Without Transformer Engine both fusions are on by default and fail: apply_rope_fusion
        # (TransformerConfig.__post_init__, "apply_rope_fusion is not available") and
        # gradient_accumulation_fusion (ColumnParallelLinear needs apex or TE).
        if v.get("position_embedding_type", "rope") == "rope" or config.megatron_model == "mla":
            args.flags.append("--no-rope-fusion")
        args.flags.append("--no-gradient-accumulation-fusion")
        # torch's norms refuse persist_layer_norm (megatron-core torch_norm.py), which is on by default.
        args.switch("no_persist_layer_norm", True, "--no-persist-layer-norm")
    args.value("ckpt_format", "torch_dist", "--ckpt-format")
    args.switch("bf16", dtype == torch.bfloat16, "--bf16")
    args.switch("fp16", dtype == torch.float16, "--fp16")
    args.value("params_dtype", dtype)
    # Read by the loaders with defaults; stated so they need none (checkpointing.py:2554-2628).
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size"):
        args.value(name, 1)
    args.value("data_parallel_size", 1)
    args.value("virtual_pipeline_model_parallel_size", None)
    args.value("encoder_tensor_model_parallel_size", 0)
    args.value("encoder_pipeline_model_parallel_size", 0)
    args.switch("no_save_optim", True, None)
    args.switch("no_save_rng", True, None)
    args.switch("ckpt_fully_parallel_save", False, None)
    for name in ("consumed_train_samples", "skipped_train_samples", "consumed_valid_samples"):
        args.value(name, 0)
    args.value("iteration", 0)
    # Read without a default by Megatron-Bridge's reader of Megatron-LM checkpoints
    # (megatron/bridge/training/mlm_compat/arguments.py:62-124 ``_transformer_config_from_args``,
    # mlm_compat/model.py:62-142 and :273, 0.6.2): Megatron-LM's defaults, where not set above.
    for name, default in MEGATRON_BRIDGE_READS.items():
        args.values.setdefault(name, default)
    scale = v.get("softmax_scale")
    kv_channels = v.get("kv_channels") or int(v["hidden_size"]) // heads
    # TransformerConfig field with no flag (arguments.py:2326); Megatron-LM's attention then
    # scales by 1/sqrt(kv_channels) (dot_product_attention.py:84-85), which may be the same.
    if scale is not None and not math.isclose(float(scale), kv_channels**-0.5, rel_tol=1e-9):
        args.not_expressible.append(f"softmax scale {scale} (Megatron-LM uses 1/sqrt(kv_channels))")
    for parameters in runtime_modules:
        gap = parameters.megatron_lm_gap()
        if gap is not None:
            args.not_expressible.append(gap)
    return args


def _normalization(args: LmArguments, config: MegatronConfig) -> None:
    v = config.values
    args.value("normalization", v.get("normalization", "LayerNorm"), "--normalization")
    args.value("layernorm_epsilon", float(v.get("layernorm_epsilon", 1e-5)), "--norm-epsilon")
    zero_centred = bool(v.get("layernorm_zero_centered_gamma", False))
    args.switch("layernorm_zero_centered_gamma", zero_centred, "--apply-layernorm-1p")
    args.values["apply_layernorm_1p"] = zero_centred


def _activation(args: LmArguments, config: MegatronConfig) -> None:
    gated = bool(config.values.get("gated_linear_unit", False))
    name = config.activation
    args.switch("swiglu", gated and name == "silu", "--swiglu")
    args.switch("squared_relu", not gated and name == "squared_relu", "--squared-relu")
    if name == "module":
        return  # the runtime module supplying it says what Megatron-LM lacks
    if not (gated and name == "silu") and not (not gated and name in ("gelu", "squared_relu")):
        kind = "gated " if gated else ""
        args.not_expressible.append(
            f"{kind}{name} activation (Megatron-LM builds swiglu, gelu or squared relu)"
        )


def _rope(args: LmArguments, config: MegatronConfig) -> None:
    v = config.values
    rope = config.rope
    position = v.get("position_embedding_type", "rope")
    base = _int_if_integral(v.get("rotary_base", 10000))
    if not isinstance(base, int):
        args.not_expressible.append(f"rotary base {base} (Megatron-LM's --rotary-base takes an integer)")
    args.switch("use_rotary_position_embeddings", position == "rope", None)
    args.value("rotary_base", int(base), "--rotary-base")
    args.value("rotary_percent", float(v.get("rotary_percent", 1.0)), "--rotary-percent")
    # A TransformerConfig field, so a store_true flag of ArgumentGroupFactory (arguments.py:2373,
    # argument_utils.py:189-191 at d98e8a64), forced from the checkpoint (checkpointing.py:2286).
    args.switch("rotary_interleaved", bool(v.get("rotary_interleaved", False)), "--rotary-interleaved")
    if config.megatron_model == "mla":
        args.value("position_embedding_type", position, "--position-embedding-type")
        return
    if rope.needs_runtime_rope():
        args.not_expressible.append(f"{rope.rope_type} RoPE scaling with parameters {dict(rope.source)}")
    settings = rope.megatron_gpt_settings()
    if rope.rope_type == "yarn":
        args.value("position_embedding_type", "yarn", "--position-embedding-type")
        args.value("rotary_scaling_factor", settings["yarn_rotary_scaling_factor"], "--rotary-scaling-factor")
        args.value(
            "yarn_original_max_position_embeddings",
            settings["yarn_original_max_position_embeddings"],
            "--yarn-original-max-position-embeddings",
        )
        args.value("yarn_beta_fast", settings["yarn_beta_fast"], "--yarn-beta-fast")
        args.value("yarn_beta_slow", settings["yarn_beta_slow"], "--yarn-beta-slow")
        args.value("mscale", settings["yarn_mscale"], "--mscale")
        args.value("mscale_all_dim", settings["yarn_mscale_all_dim"], "--mscale-all-dim")
        return
    args.value("position_embedding_type", position, "--position-embedding-type")
    if settings.get("rope_scaling"):
        args.switch("use_rope_scaling", True, "--use-rope-scaling")
        args.value("rope_scaling_factor", settings["rope_scaling_factor"], "--rope-scaling-factor")
    if "seq_len_interpolation_factor" in settings:
        args.value(
            "rotary_seq_len_interpolation_factor",
            _int_if_integral(settings["seq_len_interpolation_factor"]),
            "--rotary-seq-len-interpolation-factor",
        )


# MoE settings whose Megatron-LM argument, flag and TransformerConfig field share one name.
MOE_VALUE_FIELDS = (
    "moe_ffn_hidden_size",
    "moe_router_topk",
    "moe_shared_expert_intermediate_size",
    "moe_router_score_function",
    "moe_router_topk_scaling_factor",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_router_dtype",
)


def _moe(args: LmArguments, config: MegatronConfig) -> None:
    v = config.values
    experts = v.get("num_moe_experts")
    args.value("num_experts", experts, "--num-experts")
    if not experts:
        return
    freq = v.get("moe_layer_freq", 1)
    if isinstance(freq, list) and all(item == 1 for item in freq):
        freq = 1
    args.layer_pattern("moe_layer_freq", freq, "--moe-layer-freq")
    for name in MOE_VALUE_FIELDS:
        args.value(name, v.get(name), "--" + name.replace("_", "-"))
    args.switch("moe_router_pre_softmax", bool(v.get("moe_router_pre_softmax")), "--moe-router-pre-softmax")
    args.switch("moe_shared_expert_gate", bool(v.get("moe_shared_expert_gate")), "--moe-shared-expert-gate")
    args.switch(
        "moe_router_enable_expert_bias",
        bool(v.get("moe_router_enable_expert_bias")),
        "--moe-router-enable-expert-bias",
    )
    args.switch("moe_grouped_gemm", False, None)


# MLA settings with no Megatron-LM flag, and the value Megatron-LM's config then has.
MLA_FIXED = {"original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}


def _latent_attention(args: LmArguments, config: MegatronConfig) -> None:
    if config.megatron_model != "mla":
        return
    v = config.values
    args.switch("multi_latent_attention", True, "--multi-latent-attention")
    for name in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        args.value(name, v.get(name), "--" + name.replace("_", "-"))
    settings = config.rope.megatron_mla_settings()
    if settings.get("rope_type") == "yarn":
        args.value(
            "rotary_scaling_factor", float(settings["rotary_scaling_factor"]), "--rotary-scaling-factor"
        )
        args.value("mscale", float(settings.get("mscale", 1.0)), "--mscale")
        args.value("mscale_all_dim", float(settings.get("mscale_all_dim", 0.0)), "--mscale-all-dim")
        for name, fixed in MLA_FIXED.items():
            value = settings.get(name, fixed)
            if not math.isclose(float(value), float(fixed)):
                args.not_expressible.append(f"MLA YaRN {name} {value} (Megatron-LM fixes it at {fixed})")
    else:
        args.value("rope_type", "rope", "--rope-type")
