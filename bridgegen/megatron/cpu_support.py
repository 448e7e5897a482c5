"""What megatron-core needs to run a forward pass on a CPU-only torch.

megatron-core 0.16.1 assumes CUDA in a few places that a conversion or a parity check on a
CPU machine reaches. ``enable_cpu_execution`` patches exactly those, and only when CUDA is
absent; everything is idempotent. Building models and loading weights need none of this;
running them does.
"""

from __future__ import annotations

import torch

_STATE = {"installed": False}


def _default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    allowed = torch.ones(sq, skv, dtype=torch.bool)
    allowed = torch.triu(allowed, diagonal=skv - sq - window_size[0])
    allowed = torch.tril(allowed, diagonal=skv - sq + window_size[1])
    return ~allowed


def enable_cpu_execution() -> None:
    """Make megatron-core's forward pass work without CUDA (with CUDA: only the RNG tracker)."""
    if _STATE["installed"]:
        return
    from megatron.core import tensor_parallel

    if torch.cuda.is_available():
        # Conversion forwards run without dropout, but megatron-core's attention still forks its
        # RNG tracker; the inference tracker needs no seeding.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        _STATE["installed"] = True
        return
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.moe.moe_utils as moe_utils

    # RotaryEmbedding and others move tensors to torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment,return-value]
    # Tied embeddings across pipeline stages: the model moves the shared weight to CUDA
    # before all-reducing it between the first and last stage.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    # dist_checkpointing's writer synchronises the device before reading tensors.
    torch.cuda.synchronize = lambda device=None: None
    # The causal-mask helpers allocate on "cuda".
    fused_softmax.get_default_causal_mask = _default_causal_mask
    fused_softmax.get_sliding_window_causal_mask = _sliding_window_causal_mask
    # 0.16.1 calls te_general_gemm in the router even when Transformer Engine is absent.
    if getattr(moe_utils, "te_general_gemm", None) is None:
        moe_utils.te_general_gemm = None
    # The default RNG tracker forks CUDA generators; the inference tracker does not.
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _STATE["installed"] = True
