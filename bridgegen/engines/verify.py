"""Logits parity: HF forward vs Megatron forward on the same tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bridgegen.engines.progress import transformers_bars_hidden


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    tokens: int
    # Where the argmaxes differ: the largest gap, in the reference's logits, between its top
    # token and the candidate's (0.0 where they all agree).
    argmax_gap: float = 0.0

    def ok(self, tolerance: float) -> bool:
        """Every logit within ``tolerance``, and the same argmax everywhere but at near ties:
        tokens whose two logits the reference holds within 2 x ``tolerance`` (lower precision
        than fp32 flips some of those, whatever the conversion)."""
        ties_only = self.argmax_agreement == 1.0 or self.argmax_gap <= 2 * tolerance
        return self.max_abs_diff <= tolerance and ties_only

    def __str__(self) -> str:
        ties = f" (the others within {self.argmax_gap:.1e} in the reference)" if self.argmax_agreement < 1 else ""
        return (
            f"max|diff| {self.max_abs_diff:.3e}  mean|diff| {self.mean_abs_diff:.3e}  "
            f"argmax agreement {100 * self.argmax_agreement:.2f}%{ties} over {self.tokens} tokens"
        )


@contextlib.contextmanager
def main_head_only(model: torch.nn.Module) -> Iterator[None]:
    """Run a model with multi-token prediction layers as a plain language model: megatron-core
    only runs them to compute their training loss (it needs labels), and they do not change the
    main head's logits."""
    target: Any = model
    config: Any = getattr(model, "config", None)
    saved = (getattr(target, "mtp_process", False), getattr(config, "mtp_num_layers", None))
    if not saved[0] and saved[1] is None:
        yield
        return
    target.mtp_process = False
    config.mtp_num_layers = None
    try:
        yield
    finally:
        target.mtp_process, config.mtp_num_layers = saved


# Where models keep their transformer layers: megatron-core's GPTModel, HF causal LMs (and
# those whose language model is wrapped), GPT-2 style ones.
LAYER_LISTS = ("decoder.layers", "model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a megatron-core or HF model, in order ([] if not found)."""
    for path in LAYER_LISTS:
        found: Any = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, torch.nn.ModuleList):
            return list(found)
    return []


@contextlib.contextmanager
def counting_layers(layers: list[torch.nn.Module], update: Callable[[int], object] | None) -> Iterator[None]:
    """Within the block, ``update(1)`` as each of ``layers`` finishes its forward (a progress
    bar through a long forward); nothing without ``update``."""
    if update is None:
        yield
        return
    def done(*_: Any) -> None:  # returns None: a hook's value would replace the layer's output
        update(1)

    hooks = [layer.register_forward_hook(done) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def megatron_logits(model: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocab logits of a single-process megatron-core GPTModel (padding trimmed)."""
    from bridgegen.megatron.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    model.eval()
    with torch.no_grad(), main_head_only(model):
        logits = model(input_ids, positions, attention_mask=None)
    trimmed: torch.Tensor = logits[..., :vocab_size].float()
    return trimmed


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Parity:
    reference = reference.float()
    diff = (reference - candidate.float()).abs()
    top, chosen = reference.argmax(-1), candidate.argmax(-1)
    differ = top != chosen
    gap = 0.0
    if bool(differ.any()):
        gaps = reference.gather(-1, top.unsqueeze(-1)) - reference.gather(-1, chosen.unsqueeze(-1))
        gap = float(gaps.squeeze(-1)[differ].max().item())
    agree = float((~differ).float().mean().item())
    return Parity(diff.max().item(), diff.mean().item(), agree, reference.shape[0] * reference.shape[1], gap)


def hf_vs_megatron(
    hf_dir: str, model: torch.nn.Module, vocab_size: int, *, batch: int = 2, seq_len: int = 32, seed: int = 0
) -> Parity:
    """Run the HF model in ``hf_dir`` and ``model`` on the same random tokens (fp32 HF)."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    with transformers_bars_hidden():
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_model.train(False)
    with torch.no_grad():
        reference = hf_model(input_ids).logits.float()
    return compare(reference, megatron_logits(model, input_ids, vocab_size))
