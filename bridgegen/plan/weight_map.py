"""The conversion plan: for each Megatron tensor of a model, the HF tensors it is made of, the
spec's transform between them, and which tensor-parallel slice of them it holds.

Pure: it reads names and shapes only (meta-device models welcome) and touches no file. Every
path carries out the same plan: the model loader and the streaming import fill tensors from
it, the exporters (from a model, from a checkpoint, from ranks of a live run) write the HF
tensors it names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from bridgegen.bridge.config import MegatronConfig
from bridgegen.bridge.errors import WeightError
from bridgegen.bridge.weight_rules import HFLayout, WeightKind, WeightRule
from bridgegen.plan.transforms import Layout

# The layer number in an HF tensor name (``model.layers.12.mlp...``).
HF_LAYER_NUMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def hf_layer_numbers(hf_names: Iterable[str]) -> set[int]:
    """The layer numbers that HF tensor names hold tensors of."""
    return {int(found.group(1)) for name in hf_names if (found := HF_LAYER_NUMBER.search(name))}


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
        """This tensor's part of an HF tensor, in Megatron's orientation (a view): its expert of a
        stacked ``[E, ...]`` tensor, transposed where the spec declares HF stores ``[in, out]``,
        without the leading 1 of an ``unsqueezed`` one."""
        part = hf_tensor[self.expert] if self.rule.hf_stacked_experts else hf_tensor
        if self.rule.hf_layout is HFLayout.unsqueezed:
            if part.dim() == 0 or part.shape[0] != 1:
                names = ", ".join(repr(name) for name in self.hf_names())
                raise WeightError(
                    f"HF {names}: hf_layout unsqueezed needs a leading dim of 1, got shape {list(part.shape)}"
                )
            return part[0]
        return self.as_stored(part) if self.rule.hf_layout is HFLayout.transposed else part

    def as_stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """A Megatron-oriented tensor as the HF tensor stores it (a view): transposed where the
        spec declares ``hf_layout: transposed`` (its own inverse), with a leading dim of 1 where
        it declares ``unsqueezed``, else ``tensor``."""
        if self.rule.hf_layout is HFLayout.same:
            return tensor
        if self.rule.hf_layout is HFLayout.unsqueezed:
            return tensor.unsqueeze(0)
        if tensor.dim() != 2:
            names = ", ".join(repr(name) for name in self.hf_names())
            raise WeightError(
                f"HF {names}: hf_layout transposed needs a 2-D tensor (per expert), got shape {list(tensor.shape)}"
            )
        return tensor.t()

    @property
    def exported(self) -> bool:
        """Whether an export writes this tensor's HF tensors: not a constant tensor (HF has none),
        nor a copy of an HF tensor another Megatron tensor writes (``shares_hf_with``); an export
        checks those instead (``ExportChecks``)."""
        return self.rule.kind is not WeightKind.constant and self.rule.shares_hf_with is None


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
        mtp_layers = mtp_layer_numbers(config)
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
        by_name = {rule.megatron_name: rule for rule in self.rules}
        # (pattern of a sharing rule's name, the template of the same style of the rule it shares with)
        self._sharing: list[tuple[re.Pattern[str], str]] = []
        for rule in self.rules:
            shared = by_name.get(rule.shares_hf_with or "")
            if shared is None:
                continue
            self._sharing.append((_template_regex(rule.megatron_name), shared.megatron_name))
            if rule.te_megatron_name:
                template = shared.te_megatron_name or shared.megatron_name
                self._sharing.append((_template_regex(rule.te_megatron_name), template))
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

    def tied_output_sources(self) -> list[tuple[str, str]]:
        """(HF output layer, HF embedding) when the config ties them: a checkpoint may still
        hold the output layer, which is then only a copy of the embedding."""
        embedding = next(
            (r.hf_names[0] for r in self.rules if r.megatron_name == "embedding.word_embeddings.weight"), None
        )
        if embedding is None or not self.config.values.get("share_embeddings_and_output_weights"):
            return []
        return [
            (name, embedding)
            for rule in self.inactive
            if rule.kind is WeightKind.vocab and rule.megatron_name == "output_layer.weight"
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

    def shared_source(self, megatron_name: str) -> str | None:
        """For a Megatron tensor repeating another one's HF tensor (``shares_hf_with``), that
        other tensor's name in the same model chunk (same layer and expert numbers, same naming
        style); None for any other tensor."""
        for pattern, template in self._sharing:
            found = pattern.match(megatron_name)
            if found:
                name = template
                for key, number in found.groupdict().items():
                    name = name.replace("{" + key + "}", number)
                return name
        return None

    def carried(self, hf_name: str) -> bool:
        """An HF tensor outside the language model, passed through unconverted."""
        return hf_name.startswith(self.carried_prefixes)

    def ignored(self, hf_name: str) -> bool:
        """An HF tensor that no Megatron tensor is made of (not an error on import)."""
        if self.carried(hf_name):
            return True
        if self.ignore_layers_from is not None:
            found = HF_LAYER_NUMBER.search(hf_name)
            if found and int(found.group(1)) >= self.ignore_layers_from:
                return True
        return any(pattern.match(hf_name) for pattern in self._ignore)

    def layout(self, tp_rank: int = 0, tp_size: int = 1) -> Layout:
        cfg = self.config
        heads = int(cfg.value("num_attention_heads"))
        groups = cfg.values.get("num_query_groups") or heads
        head_dim = cfg.values.get("kv_channels") or int(cfg.value("hidden_size")) // heads
        return Layout(heads, int(groups), int(head_dim), cfg.vocab_size, tp_rank, tp_size)


def mtp_layer_numbers(config: MegatronConfig) -> list[int]:
    """HF layer numbers of the multi-token prediction layers (they follow the decoder layers)."""
    count = int(config.values.get("mtp_num_layers") or 0)
    first = int(config.values.get("num_layers") or 0)
    return list(range(first, first + count))


@dataclass(frozen=True)
class TensorPlan:
    """One Megatron tensor: its name, shape and dtype, the rule that maps it (HF names,
    transform, layer, expert) and its slice of those HF tensors (``layout.tp_rank`` of
    ``layout.tp_size``)."""

    megatron_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    matched: MatchedTensor
    layout: Layout

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.matched.hf_names()

    @property
    def kind(self) -> WeightKind:
        return self.matched.rule.kind

    @property
    def is_expert(self) -> bool:
        return self.matched.expert is not None

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a conversion fills: every parameter (shared ones once) and the buffers that
    carry weights (e.g. a router's expert bias)."""
    yield from model.named_parameters()
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            yield name, buffer


def plan_tensor(
    weight_map: WeightMap,
    name: str,
    tensor: torch.Tensor,
    *,
    layer_offset: int = 0,
    expert_offset: int = 0,
    tp: tuple[int, int] = (0, 1),
    expert_tp: tuple[int, int] = (0, 1),
) -> TensorPlan:
    """The plan of Megatron tensor ``name`` (its shape and dtype from ``tensor``) of a model
    chunk whose first layer is ``layer_offset`` and first expert ``expert_offset``, on the rank
    ``tp`` = (rank, size) of its tensor-parallel group (``expert_tp`` for experts)."""
    matched = weight_map.match(name, layer_offset, expert_offset)
    rank, size = tp if matched.expert is None else expert_tp
    return TensorPlan(name, tuple(tensor.shape), tensor.dtype, matched, weight_map.layout(rank, size))


def plan_tensors(
    weight_map: WeightMap,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    layer_offset: int = 0,
    expert_offset: int = 0,
    tp: tuple[int, int] = (0, 1),
    expert_tp: tuple[int, int] = (0, 1),
) -> list[TensorPlan]:
    """``plan_tensor`` for every (name, tensor), in order."""
    return [
        plan_tensor(
            weight_map,
            name,
            tensor,
            layer_offset=layer_offset,
            expert_offset=expert_offset,
            tp=tp,
            expert_tp=expert_tp,
        )
        for name, tensor in tensors
    ]


_Key = tuple[str, int | None, int | None]


class ExportChecks:
    """The Megatron tensors an export checks instead of writing (``MatchedTensor.exported``):
    a constant tensor must hold its value, and a copy of another tensor's HF tensor must equal
    that tensor, which may come before or after it (both are kept until the pair is complete;
    they are small, norms and biases). One per export; ``finish`` at its end."""

    def __init__(self, weight_map: WeightMap) -> None:
        self.weight_map = weight_map
        self._sources = {
            rule.shares_hf_with for rule in weight_map.rules if rule.shares_hf_with is not None
        }
        # (a shared rule's name, layer, expert): that tensor's name and value, or its copies'
        self._held: dict[_Key, tuple[str, torch.Tensor]] = {}
        self._waiting: dict[_Key, list[tuple[str, torch.Tensor]]] = {}

    def offer(self, megatron_name: str, tensor: torch.Tensor, matched: MatchedTensor) -> bool:
        """Check ``tensor`` where it is checked, not written (then False); True for a tensor the
        export writes. Names are a model chunk's own; meta tensors are not compared."""
        from bridgegen.plan.transforms import constant_mismatches

        rule = matched.rule
        if rule.kind is WeightKind.constant:
            wrong = constant_mismatches(tensor, rule.value)
            if wrong:
                raise WeightError(
                    f"Megatron {megatron_name!r}: {wrong} of {tensor.numel()} entries differ from {rule.value}, "
                    "the value the spec fixes for it (HF has no tensor for it: an export would lose them)"
                )
            return False
        if rule.shares_hf_with is not None:
            key = (rule.shares_hf_with, matched.layer, matched.expert)
            if key in self._held:
                self._compare(megatron_name, tensor, *self._held[key])
            else:
                self._waiting.setdefault(key, []).append((megatron_name, _kept(tensor)))
            return False
        if rule.megatron_name in self._sources:
            key = (rule.megatron_name, matched.layer, matched.expert)
            self._held[key] = (megatron_name, _kept(tensor))
            for copy, kept in self._waiting.pop(key, []):
                self._compare(copy, kept, megatron_name, tensor)
        return True

    def finish(self) -> None:
        """Every copy met the tensor it repeats."""
        if self._waiting:
            (source, _, _), copies = next(iter(self._waiting.items()))
            raise WeightError(
                f"Megatron {copies[0][0]!r} repeats the HF tensor of {source!r}, which this export does not hold"
            )

    @staticmethod
    def _compare(copy: str, copy_tensor: torch.Tensor, source: str, source_tensor: torch.Tensor) -> None:
        if copy_tensor.is_meta or source_tensor.is_meta:
            return
        if copy_tensor.shape != source_tensor.shape or not torch.equal(copy_tensor, source_tensor):
            differing = (
                int(torch.count_nonzero(copy_tensor != source_tensor))
                if copy_tensor.shape == source_tensor.shape
                else copy_tensor.numel()
            )
            raise WeightError(
                f"Megatron {copy!r} and {source!r} come from one HF tensor, but {differing} of "
                f"{copy_tensor.numel()} entries now differ: HF holds one tensor for both, so no export can "
                "keep both (the model was trained with them apart)"
            )


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_meta else tensor.detach().clone()
