"""Matching Megatron parameter names to spec weight rules, and moving tensors through them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from bridgegen.runtime.config import MegatronConfig
from bridgegen.runtime.errors import WeightError
from bridgegen.runtime.fp8 import scale_name
from bridgegen.runtime.safetensors_io import Checkpoint
from bridgegen.runtime.transforms import Layout, load_shard, split_full
from bridgegen.runtime.weight_rules import WeightKind, WeightRule


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = (
        re.escape(template)
        .replace(r"\{layer\}", r"(?P<layer>\d+)")
        .replace(r"\{expert\}", r"(?P<expert>\d+)")
    )
    return re.compile("^" + pattern + "$")


@dataclass(frozen=True)
class MatchedTensor:
    """A Megatron parameter with the rule that maps it and its global layer number."""

    megatron_name: str
    rule: WeightRule
    layer: int | None
    expert: int | None = None  # global expert number (local number + this rank's expert offset)

    def hf_names(self) -> tuple[str, ...]:
        return self._fill(self.rule.hf_names)

    def hf_copies(self) -> tuple[str, ...]:
        """HF tensors that repeat this tensor's (single) HF tensor."""
        return self._fill(self.rule.hf_copies)

    def _fill(self, names: tuple[str, ...]) -> tuple[str, ...]:
        if self.layer is not None:
            names = tuple(name.replace("{layer}", str(self.layer)) for name in names)
        if self.expert is not None:
            names = tuple(name.replace("{expert}", str(self.expert)) for name in names)
        return names

    def select(self, hf_tensor: torch.Tensor) -> torch.Tensor:
        """This tensor's part of an HF tensor: its expert of a stacked ``[E, ...]`` tensor."""
        return hf_tensor[self.expert] if self.rule.hf_stacked_experts else hf_tensor


class WeightMap:
    """The rules of one bridge that apply to one config, with name matching."""

    def __init__(
        self,
        rules: Iterable[WeightRule],
        config: MegatronConfig,
        hf_ignore: Iterable[str] = (),
        ignore_layers_from: int | None = None,
        *,
        hf_prefix: str = "",
        carried: Sequence[str] = (),
    ) -> None:
        """``hf_prefix`` is prepended to every HF name (a language model inside a larger HF
        model); HF tensors under a ``carried`` prefix belong to the rest of that model."""
        mtp_layers = _mtp_layer_numbers(config)
        rules = [
            dataclasses.replace(
                rule,
                hf_names=tuple(hf_prefix + n for n in rule.hf_names),
                hf_copies=tuple(
                    hf_prefix + copy.replace("{mtp_layer}", str(number))
                    for copy in rule.hf_copies
                    for number in (mtp_layers if "{mtp_layer}" in copy else [None])
                ),
            )
            for rule in rules
        ]
        hf_ignore = [hf_prefix + name for name in hf_ignore]
        self.carried_prefixes = tuple(carried)
        self.config = config
        # HF layers numbered from here on are skipped (a checkpoint's multi-token prediction
        # layers follow its decoder layers, e.g. DeepSeek-V3's model.layers.61).
        self.ignore_layers_from = ignore_layers_from
        self.rules = [rule for rule in rules if rule.applies(config)]
        self.inactive = [rule for rule in rules if not rule.applies(config)]
        self._patterns: list[tuple[re.Pattern[str], WeightRule]] = []
        for rule in self.rules:
            self._patterns.append((_template_regex(rule.megatron_name), rule))
            if rule.te_megatron_name:
                self._patterns.append((_template_regex(rule.te_megatron_name), rule))
        self._ignore = [_template_regex(t) for t in hf_ignore]
        # Copies are written on export, never read: the tensor they repeat is.
        self._ignore += [_template_regex(name) for rule in rules for name in rule.hf_copies]
        # An untied output layer's HF tensor may still be present in a tied checkpoint.
        self._ignore += [
            _template_regex(name)
            for rule in self.inactive
            if rule.kind is WeightKind.vocab
            for name in rule.hf_names
        ]

    def is_tied_output(self, megatron_name: str) -> bool:
        """The last pipeline stage's copy of a tied output layer (it mirrors the embedding)."""
        return megatron_name == "output_layer.weight" and bool(
            self.config.values.get("share_embeddings_and_output_weights")
        )

    def maps(self, megatron_name: str) -> bool:
        return self.is_tied_output(megatron_name) or any(p.match(megatron_name) for p, _ in self._patterns)

    def match(self, megatron_name: str, layer_offset: int = 0, expert_offset: int = 0) -> MatchedTensor:
        if self.is_tied_output(megatron_name):
            megatron_name = "embedding.word_embeddings.weight"
        mtp = re.match(r"^mtp\.layers\.(\d+)\.(.*)$", megatron_name)
        if mtp:
            # Multi-token prediction layer m is numbered num_layers + m on the HF side; its
            # transformer layer maps like a decoder layer of that number.
            number = int(self.config.value("num_layers")) + int(mtp.group(1))
            rest = mtp.group(2)
            # megatron-core 0.19 calls the inner layer mtp_model_layer (its checkpoint keys keep
            # transformer_layer).
            inner = next((p for p in ("transformer_layer.", "mtp_model_layer.") if rest.startswith(p)), None)
            if inner is not None:
                megatron_name = f"decoder.layers.{number}.{rest.removeprefix(inner)}"
            else:
                megatron_name = f"mtp.layers.{number}.{rest}"
            layer_offset = 0
        for pattern, rule in self._patterns:
            found = pattern.match(megatron_name)
            if found:
                groups = found.groupdict()
                layer = None if groups.get("layer") is None else int(groups["layer"]) + layer_offset
                expert = None if groups.get("expert") is None else int(groups["expert"]) + expert_offset
                return MatchedTensor(megatron_name, rule, layer, expert)
        raise WeightError(
            f"Megatron tensor {megatron_name!r} has no rule in the {self.config.family} spec "
            "(add it to the spec's weights, or this architecture variant is not supported yet)"
        )

    def carried(self, hf_name: str) -> bool:
        """An HF tensor outside the language model, passed through unconverted."""
        return hf_name.startswith(self.carried_prefixes)

    def ignored(self, hf_name: str) -> bool:
        """An HF tensor that no Megatron tensor is made of (not an error on import)."""
        if self.carried(hf_name):
            return True
        if self.ignore_layers_from is not None:
            found = re.search(r"(?:^|\.)layers\.(\d+)\.", hf_name)
            if found and int(found.group(1)) >= self.ignore_layers_from:
                return True
        return any(pattern.match(hf_name) for pattern in self._ignore)

    def layout(self, tp_rank: int = 0, tp_size: int = 1) -> Layout:
        cfg = self.config
        heads = int(cfg.value("num_attention_heads"))
        groups = cfg.values.get("num_query_groups") or heads
        head_dim = cfg.values.get("kv_channels") or int(cfg.value("hidden_size")) // heads
        return Layout(heads, int(groups), int(head_dim), cfg.vocab_size, tp_rank, tp_size)


def _mtp_layer_numbers(config: MegatronConfig) -> list[int]:
    """HF layer numbers of the multi-token prediction layers (they follow the decoder layers)."""
    count = int(config.values.get("mtp_num_layers") or 0)
    first = int(config.values.get("num_layers") or 0)
    return list(range(first, first + count))


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a conversion fills: every parameter (shared ones once) and the buffers that
    carry weights (e.g. a router's expert bias)."""
    yield from model.named_parameters()
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            yield name, buffer


@dataclass
class LoadStats:
    tensors: int = 0
    bytes_requested: int = 0
    hf_tensors_used: int = 0


def check_sources(
    weight_map: WeightMap,
    plan: Sequence[tuple[str, torch.Tensor, MatchedTensor]],
    checkpoint: Checkpoint,
    layout: Layout,
    expert_layout: Layout,
    *,
    check_unused: bool = True,
) -> None:
    """Before anything is read or written: every HF tensor each (Megatron name, tensor,
    match) needs is in ``checkpoint`` and floating point, no HF tensor is left unmapped
    (``check_unused``), and every shape fits, checked against meta stand-ins."""
    for _, _, matched in plan:
        for hf_name in matched.hf_names():
            if hf_name not in checkpoint:
                raise WeightError(
                    f"{checkpoint.folder}: missing tensor {hf_name!r} (needed for Megatron {matched.megatron_name!r})"
                )
            info = checkpoint.tensors[hf_name]
            if not info.dtype.is_floating_point:
                raise WeightError(
                    f"{info.file}: tensor {hf_name!r} has dtype {info.dtype}; expected floating point"
                )
    if check_unused:
        wanted = {hf for _, _, matched in plan for hf in matched.hf_names()}
        wanted |= {scale_name(hf) for hf in wanted}  # FP8 scales travel with their weights
        unexpected = [n for n in checkpoint.names() if n not in wanted and not weight_map.ignored(n)]
        if unexpected:
            shown = ", ".join(repr(n) for n in unexpected[:8])
            more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
            raise WeightError(
                f"{checkpoint.folder}: unexpected tensor(s) {shown}{more}: the {weight_map.config.family} spec maps no "
                "Megatron tensor to them"
            )
    for name, param, matched in plan:
        hf_names = matched.hf_names()
        try:
            load_shard(
                matched.rule.kind,
                torch.empty(param.shape, dtype=param.dtype, device="meta"),
                [matched.select(checkpoint.view(n)) for n in hf_names],
                hf_names,
                layout if matched.expert is None else expert_layout,
                lambda tensor: tensor,
                matched.rule.norm_offset,
            )
        except WeightError as exc:
            raise WeightError(f"{checkpoint.folder}: {exc} (loading Megatron {name!r})") from None


def fill_parameter(
    name: str,
    target: torch.Tensor,
    matched: MatchedTensor,
    checkpoint: Checkpoint,
    layout: Layout,
    fp8_block: tuple[int, int] = (128, 128),
) -> None:
    """Copy Megatron tensor ``name``'s slice ``layout`` asks for from ``checkpoint`` into
    ``target``, then hand the sources' pages back."""
    hf_names = matched.hf_names()
    sources = [matched.select(checkpoint.source(n, fp8_block)) for n in hf_names]
    try:
        with torch.no_grad():
            load_shard(
                matched.rule.kind,
                target,
                sources,
                hf_names,
                layout,
                checkpoint.count,
                matched.rule.norm_offset,
            )
    except WeightError as exc:
        raise WeightError(f"{checkpoint.folder}: {exc} (loading Megatron {name!r})") from None
    for hf_name in hf_names:
        checkpoint.release(hf_name)


def load_into(
    weight_map: WeightMap,
    model: torch.nn.Module,
    checkpoint: Checkpoint,
    *,
    layer_offset: int = 0,
    tp_rank: int = 0,
    tp_size: int = 1,
    expert_offset: int = 0,
    expert_tp_rank: int = 0,
    expert_tp_size: int = 1,
    check_unused: bool = True,
    progress: Callable[[int], object] | None = None,
    fp8_block: tuple[int, int] = (128, 128),
) -> LoadStats:
    """Copy every parameter of ``model`` from ``checkpoint``; each rank reads only its slices."""
    layout = weight_map.layout(tp_rank, tp_size)
    expert_layout = weight_map.layout(expert_tp_rank, expert_tp_size)
    used: set[str] = set()
    stats = LoadStats()
    params = list(model_tensors(model))
    plan = [(name, param, weight_map.match(name, layer_offset, expert_offset)) for name, param in params]
    check_sources(weight_map, plan, checkpoint, layout, expert_layout, check_unused=check_unused)
    before = checkpoint.bytes_requested
    with torch.no_grad():
        for name, param, matched in plan:
            fill_parameter(
                name,
                param.data,
                matched,
                checkpoint,
                layout if matched.expert is None else expert_layout,
                fp8_block,
            )
            used.update(matched.hf_names())
            stats.tensors += 1
            if progress is not None:
                progress(1)
    stats.hf_tensors_used = len(used)
    stats.bytes_requested = checkpoint.bytes_requested - before
    return stats


def iter_hf_from_full(
    weight_map: WeightMap,
    named_full_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    layer_offset: int = 0,
    expert_offset: int = 0,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor) for whole Megatron tensors (already gathered over TP). A stacked HF
    expert tensor is yielded once all its experts have come by."""
    layout = weight_map.layout()
    experts = int(weight_map.config.values.get("num_moe_experts") or 0)
    stacks: dict[str, list[torch.Tensor | None]] = {}
    for name, full in named_full_tensors:
        matched = weight_map.match(name, layer_offset, expert_offset)
        pieces = split_full(matched.rule.kind, full.detach(), layout, matched.rule.norm_offset)
        for hf_name, piece in zip(matched.hf_names(), pieces, strict=True):
            piece = piece if dtype is None else piece.to(dtype)
            if not matched.rule.hf_stacked_experts:
                yield hf_name, piece
                for copy in matched.hf_copies():
                    yield copy, piece
                continue
            stack = stacks.setdefault(hf_name, [None] * experts)
            assert matched.expert is not None
            stack[matched.expert] = piece
            if all(part is not None for part in stack):
                yield hf_name, torch.stack([part for part in stacks.pop(hf_name) if part is not None])
    if stacks:
        missing = ", ".join(sorted(stacks))
        raise WeightError(f"stacked expert tensor(s) {missing}: not every expert is held by this process")
