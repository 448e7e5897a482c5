"""Logits parity: HF forward vs Megatron forward on the same tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    tokens: int

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance and self.argmax_agreement == 1.0

    def __str__(self) -> str:
        return (
            f"max|diff| {self.max_abs_diff:.3e}  mean|diff| {self.mean_abs_diff:.3e}  "
            f"argmax agreement {100 * self.argmax_agreement:.2f}% over {self.tokens} tokens"
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
    diff = (reference.float() - candidate.float()).abs()
    agree = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return Parity(diff.max().item(), diff.mean().item(), agree, reference.shape[0] * reference.shape[1])


def hf_vs_megatron(
    hf_dir: str, model: torch.nn.Module, vocab_size: int, *, batch: int = 2, seq_len: int = 32, seed: int = 0
) -> Parity:
    """Run the HF model in ``hf_dir`` and ``model`` on the same random tokens (fp32 HF)."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_model.train(False)
    with torch.no_grad():
        reference = hf_model(input_ids).logits.float()
    return compare(reference, megatron_logits(model, input_ids, vocab_size))
