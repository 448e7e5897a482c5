"""The runtime modules, each on its own (small stand-in models or a reference formula), and
their selection by a spec's ``runtime_modules``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bridgegen.bridge import module_parameters as quirks
from bridgegen.bridge.module_parameters import BUILTIN_MODULES, ModuleParameters
from bridgegen.megatron import modules


@pytest.mark.parametrize("module", BUILTIN_MODULES, ids=lambda m: m.name)
def test_every_builtin_module_declares_itself_and_names_a_real_implementation(
    module: type[ModuleParameters],
) -> None:
    assert quirks.declaration_errors(module) == []
    path, _, function = module.implementation.partition(":")
    assert path == "bridgegen.megatron.modules" and callable(getattr(modules, function))
    assert len({m.name for m in BUILTIN_MODULES}) == len(BUILTIN_MODULES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_centered_norm_is_gemmas_bit_for_bit(dtype: torch.dtype) -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(0)
    reference = GemmaRMSNorm(32, eps=1e-6).to(dtype)
    ours = modules.ZeroCenteredRMSNorm(SimpleNamespace(params_dtype=dtype), 32, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_(0.0, 0.5)
        ours.weight.copy_(reference.weight)
    x = torch.randn(3, 5, 32).to(dtype)
    assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_centered_layer_norm_is_nemotrons_bit_for_bit(dtype: torch.dtype) -> None:
    """Nemotron's LayerNorm1P: ``layer_norm(x, 1 + w, b)``, the norm megatron-core means by
    ``normalization: LayerNorm`` with ``layernorm_zero_centered_gamma``."""
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    torch.manual_seed(0)
    reference = NemotronLayerNorm1P(32, eps=1e-5).to(dtype)
    ours = modules.ZeroCenteredLayerNorm(SimpleNamespace(params_dtype=dtype), 32, eps=1e-5)
    with torch.no_grad():
        reference.weight.normal_(0.0, 0.5)
        reference.bias.normal_(0.0, 0.5)
        ours.weight.copy_(reference.weight)
        ours.bias.copy_(reference.bias)
    x = torch.randn(3, 5, 32).to(dtype)
    assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_zero_centered_gamma_builds_the_norm_the_config_names(normalization: str) -> None:
    """megatron-core's zero-centred gamma means ``1 + w`` for either norm; a LayerNorm model
    must not be built with RMSNorms (which would compute another model from the same weights)."""
    from bridgegen.engines.model import ModelBridge
    from bridgegen.megatron.rule_check import norm_kind_errors
    from bridgegen.spec.errors import Location

    bridge = ModelBridge.from_hf_config(_gemma2_config())
    values = dict(bridge.config.values, normalization=normalization, layernorm_zero_centered_gamma=True)
    values.update(post_layer_norms=None)
    import dataclasses

    changed = dataclasses.replace(bridge, config=dataclasses.replace(bridge.config, values=values))
    model = changed.build_model(torch.float32)
    layer = model.decoder.layers[0]
    expected = modules.ZeroCenteredLayerNorm if normalization == "LayerNorm" else modules.ZeroCenteredRMSNorm
    assert type(layer.input_layernorm) is expected and type(model.decoder.final_layernorm) is expected
    where = Location("x.yaml", 1, 1)
    assert norm_kind_errors(model, normalization, where) == []
    other = "RMSNorm" if normalization == "LayerNorm" else "LayerNorm"
    errors = norm_kind_errors(model, other, where)
    assert errors and all(f"but the spec's normalization is {other}" in e.message for e in errors)
    assert any("decoder.final_layernorm is built as" in e.message for e in errors)


class _Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embedding(ids)
        return out


def test_embedding_scale_multiplies_in_the_activation_dtype() -> None:
    torch.manual_seed(0)
    model = _Embedder().to(torch.bfloat16)
    ids = torch.arange(10)
    plain = model(ids)
    modules.scale_embeddings(model, 2048**0.5)
    scaled = model(ids)
    # As Gemma does: the scale is rounded to the activations' dtype first (45.25 in bf16).
    assert torch.equal(scaled, plain * torch.tensor(2048**0.5, dtype=torch.bfloat16))
    assert not torch.equal(scaled, (plain.float() * 2048**0.5).to(torch.bfloat16))


def test_softcapped_scores_are_bounded_by_the_cap() -> None:
    softmax_input: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):
        def forward(self, scores: torch.Tensor, mask: Any) -> torch.Tensor:
            softmax_input.append(scores)
            return scores

    capped = modules._Softcapped(Recorder(), cap=50.0)
    scores = torch.tensor([-1000.0, -10.0, 0.0, 10.0, 1000.0])
    capped(scores, None)
    assert torch.allclose(softmax_input[0], 50.0 * torch.tanh(scores / 50.0))
    assert softmax_input[0].abs().max() <= 50.0
    assert softmax_input[0][2] == 0.0


class _Head(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.output_layer = torch.nn.Linear(4, 6, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.output_layer(x), None


def test_final_logit_softcapping_caps_the_output_layer() -> None:
    class Layer(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> Any:  # megatron-core layers return (out, bias)
            return super().forward(x), None

    head = torch.nn.Module()
    head.output_layer = Layer(4, 6, bias=False)
    x = torch.randn(2, 4) * 100
    plain, _ = head.output_layer(x)
    modules.softcap_final_logits(head, 30.0)
    capped, bias = head.output_layer(x)
    assert bias is None
    assert torch.allclose(capped, 30.0 * torch.tanh(plain / 30.0))


class _Returns(torch.nn.Module):
    """A megatron-core sublayer stand-in returning (output, bias)."""

    def __init__(self, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return 2 * x, self.bias


def _one_layer_model(zero_centered: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    layer = torch.nn.Module()
    layer.config = SimpleNamespace(
        hidden_size=8,
        layernorm_epsilon=1e-6,
        params_dtype=torch.float32,
        layernorm_zero_centered_gamma=zero_centered,
        normalization="RMSNorm",
    )
    layer.self_attention = _Returns(torch.full((8,), 0.5))
    layer.mlp = _Returns(None)
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([layer])
    return model, layer


@pytest.mark.parametrize("zero_centered", [True, False], ids=["gemma_1_plus_w", "olmo2_plain_w"])
def test_post_layer_norms_norm_each_sublayer_output_with_its_bias_added(zero_centered: bool) -> None:
    model, layer = _one_layer_model(zero_centered)
    modules.add_post_layer_norms(model)
    with torch.no_grad():  # scale 2 on attention outputs, 1 on MLP outputs, either way
        layer.post_self_attn_layernorm.weight.fill_(1.0 if zero_centered else 2.0)
        layer.post_mlp_layernorm.weight.fill_(0.0 if zero_centered else 1.0)

    def rms(t: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.randn(3, 8)
    attention_out, attention_bias = layer.self_attention(x)
    assert attention_bias is None  # folded in before the norm
    assert torch.allclose(attention_out, 2.0 * rms(2 * x + 0.5))
    mlp_out, _ = layer.mlp(x)
    assert torch.allclose(mlp_out, rms(2 * x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_norm_is_olmo2s_bit_for_bit(dtype: torch.dtype) -> None:
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(0)
    reference = Olmo2RMSNorm(32, eps=1e-6).to(dtype)
    ours = modules.PlainRMSNorm(SimpleNamespace(params_dtype=dtype), 32, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_(1.0, 0.5)
        ours.weight.copy_(reference.weight)
    x = torch.randn(4, 32).to(dtype)
    assert torch.equal(ours(x), reference(x))


def test_residual_multiplier_scales_each_sublayer_output_with_its_bias_added() -> None:
    model, layer = _one_layer_model(False)
    modules.multiply_residual_branches(model, 0.25)
    x = torch.randn(3, 8)
    attention_out, attention_bias = layer.self_attention(x)
    assert attention_bias is None
    assert torch.equal(attention_out, (2 * x + 0.5) * 0.25)
    assert torch.equal(layer.mlp(x)[0], (2 * x) * 0.25)


def test_logits_scaling_divides_the_logits() -> None:
    model = torch.nn.Module()
    model.output_layer = _Returns(None)
    modules.divide_logits(model, 8.0)
    x = torch.randn(3, 8)
    assert torch.equal(model.output_layer(x)[0], (2 * x) / 8.0)


def test_norm_over_heads_is_olmo2s_q_norm_over_the_whole_projection() -> None:
    """One process (tensor parallel size 1): [s, b, heads, head_dim] normed over heads * head_dim
    as HF's q_norm on the flat projection; the TP=2 case is in test_module_families."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    torch.manual_seed(0)
    config = SimpleNamespace(
        num_attention_heads=4, num_query_groups=2, tensor_model_parallel_size=1, params_dtype=torch.float32
    )
    queries = modules.NormOverHeads(config, 8, eps=1e-6)
    keys = modules.KeyNormOverHeads(config, 8, eps=1e-6)
    assert queries.weight.shape == (32,) and keys.weight.shape == (16,)
    for ours, heads in ((queries, 4), (keys, 2)):
        reference = Olmo2RMSNorm(heads * 8, eps=1e-6)
        with torch.no_grad():
            reference.weight.normal_(1.0, 0.5)
            ours.weight.copy_(reference.weight)
        x = torch.randn(5, 2, heads, 8)
        assert torch.equal(ours(x), reference(x.reshape(5, 2, -1)).reshape(x.shape))


def test_norm_over_heads_refuses_heads_that_do_not_split_over_tensor_parallel_ranks() -> None:
    config = SimpleNamespace(
        num_attention_heads=4, num_query_groups=1, tensor_model_parallel_size=2, params_dtype=torch.float32
    )
    from bridgegen.bridge.errors import ConfigError

    with pytest.raises(ConfigError, match="num_query_groups 1 does not split over tensor parallel size 2"):
        modules.KeyNormOverHeads(config, 8)


class _Recording(torch.nn.Module):
    def __init__(self, layer_number: int, config: Any) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.config = config
        self.seen: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, rotary_pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        self.seen = rotary_pos_emb
        return hidden


def test_local_rope_base_reaches_only_the_windowed_layers() -> None:
    from bridgegen.megatron.cpu_support import enable_cpu_execution

    enable_cpu_execution()  # as the model builder does: megatron-core's rotary embedding is CUDA-first
    dim, seq, local_base = 16, 12, 10000.0
    config = SimpleNamespace(
        window_size=(4, 0), window_attn_skip_freq=3, kv_channels=dim, use_cpu_initialization=True
    )
    model = torch.nn.Module()
    model.decoder = torch.nn.Module()
    model.decoder.layers = torch.nn.ModuleList([_Recording(n, config) for n in range(1, 7)])
    modules.use_local_rope_base(model, local_base)
    global_rope = torch.full((seq, 1, 1, dim), 7.0)
    for layer in model.decoder.layers:
        layer(torch.zeros(1), rotary_pos_emb=global_rope)
    inv_freq = 1.0 / local_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    local = torch.cat([freqs, freqs], dim=-1).view(seq, 1, 1, dim)
    for layer in model.decoder.layers:
        if layer.layer_number % 3 == 0:  # one global layer in three
            assert layer.seen is global_rope, layer.layer_number
        else:
            assert layer.seen is not None and torch.allclose(layer.seen, local), layer.layer_number


def test_latent_core_attention_matches_plain_softmax_attention() -> None:
    sq, b, heads, k_dim, v_dim = 6, 2, 3, 8, 5
    torch.manual_seed(0)
    q, k = torch.randn(sq, b, heads, k_dim), torch.randn(sq, b, heads, k_dim)
    v = torch.randn(sq, b, heads, v_dim)
    attention = modules.LatentCoreAttention(
        None, 1, None, softmax_scale=0.3, k_channels=k_dim, v_channels=v_dim
    )
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * 0.3
    causal = torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(causal, float("-inf")).softmax(-1)
    expected = torch.einsum("bhst,tbhd->sbhd", weights, v).reshape(sq, b, heads * v_dim)
    assert torch.allclose(attention(q, k, v, None), expected, atol=1e-6)
    # An explicit megatron-core mask (True = masked) gives the same.
    assert torch.allclose(attention(q, k, v, causal.view(1, 1, sq, sq)), expected, atol=1e-6)


def _gemma2_config(**changes: Any) -> dict[str, Any]:
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 64,
        "max_position_embeddings": 64,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 8,
    } | changes


def test_the_bridge_selects_the_modules_its_spec_names() -> None:
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_config(_gemma2_config())
    assert bridge.runtime_modules() == [
        quirks.EmbeddingScale(scale=32**0.5),
        quirks.FinalLogitSoftcapping(cap=30.0),
        quirks.PostLayerNorms(enabled=True),
        quirks.SoftcappedAttention(cap=50.0),
    ]
    model = bridge.build_model(torch.float32)
    layer = model.decoder.layers[0]
    assert isinstance(layer.self_attention.core_attention.scale_mask_softmax, modules._Softcapped)
    assert isinstance(layer.post_mlp_layernorm, modules.ZeroCenteredRMSNorm)
    # A module whose field has no value is not applied.
    uncapped = ModelBridge.from_hf_config(_gemma2_config(attn_logit_softcapping=None))
    assert "softcapped_attention" not in [module.name for module in uncapped.runtime_modules()]
    plain = uncapped.build_model(torch.float32).decoder.layers[0].self_attention.core_attention
    assert not isinstance(plain.scale_mask_softmax, modules._Softcapped)


def test_an_extra_field_no_module_reads_is_refused_at_build() -> None:
    from bridgegen.generated.gemma2 import Gemma2Bridge

    from bridgegen.bridge.errors import ConfigError
    from bridgegen.engines.model import ModelBridge

    class WithoutSoftcapping(Gemma2Bridge):
        runtime_modules = {
            "embedding_scale": {"scale": "embedding_scale"},
            "post_layer_norms": {"enabled": "post_layer_norms"},
            "final_logit_softcapping": {"cap": "final_logit_softcapping"},
        }

    config = WithoutSoftcapping.to_megatron_config(_gemma2_config())
    with pytest.raises(
        ConfigError, match=r"gemma2: the runtime cannot build a model with attn_logit_softcapping"
    ):
        ModelBridge(WithoutSoftcapping, config).build_model(torch.float32)


@pytest.mark.parametrize("module", BUILTIN_MODULES, ids=lambda m: m.name)
def test_every_module_says_what_megatron_lm_lacks_with_its_values(module: type[ModuleParameters]) -> None:
    """Megatron-LM has no flag for any module so far (megatron/training/arguments.py): each
    names its gap, with its parameters' values filled in."""
    samples = {float: 1.5, bool: True}
    declared = module.model_fields
    parameters = module(**{name: samples[f.annotation] for name, f in declared.items()})
    gap = parameters.megatron_lm_gap()
    assert gap is not None and "{" not in gap
    for name in declared:
        if declared[name].annotation is float:
            assert "1.5" in gap, (module, name)


def test_a_module_value_of_the_wrong_type_is_refused_naming_field_and_module() -> None:
    import dataclasses

    from bridgegen.bridge.errors import ConfigError
    from bridgegen.engines.model import ModelBridge

    bridge = ModelBridge.from_hf_config(_gemma2_config())
    values = dict(bridge.config.values, post_layer_norms=1.5)
    wrong = dataclasses.replace(bridge, config=dataclasses.replace(bridge.config, values=values))
    with pytest.raises(
        ConfigError,
        match=r"^gemma2: Megatron field 'post_layer_norms' feeds parameter 'enabled' of runtime module "
        r"'post_layer_norms': 1.5 is not a bool",
    ):
        wrong.runtime_modules()
