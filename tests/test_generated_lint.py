"""Generated modules pass the project's own checks (``make check``: ruff, mypy --strict) for
spec shapes the repository's specs may not have yet, such as a Megatron field that only a
weight's ``when:`` reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridgegen.spec.generate import render_project

# Builds megatron-core models or runs conversions and local ranks: not in `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# qk_layernorm (a fixed value) and add_qkv_bias (an expression) are read by weight conditions
# only: no HF field is written from them. The two k_norm rules map one HF tensor under
# conditions that exclude each other.
WHEN_ONLY_SPEC = """\
extends: _base
architectures: [TinyForCausalLM]
model_types: [tiny]
config:
  hf_optional:
    attention_bias: false
  to_megatron:
    add_qkv_bias: "attention_bias"
  megatron_defaults:
    qk_layernorm: true
weights:
  decoder.layers.{layer}.self_attention.q_layernorm.weight:
    hf: model.layers.{layer}.self_attn.q_norm.weight
    kind: replicated
    when: qk_layernorm
  decoder.layers.{layer}.self_attention.linear_qkv.bias:
    hf:
      - model.layers.{layer}.self_attn.q_proj.bias
      - model.layers.{layer}.self_attn.k_proj.bias
      - model.layers.{layer}.self_attn.v_proj.bias
    kind: qkv
    when: add_qkv_bias and not qk_layernorm
  decoder.layers.{layer}.self_attention.k_layernorm.weight:
    hf: model.layers.{layer}.self_attn.k_norm.weight
    kind: replicated
    when: qk_layernorm
  decoder.layers.{layer}.self_attention.k_norm_unused.weight:
    hf: model.layers.{layer}.self_attn.k_norm.weight
    kind: replicated
    when: not qk_layernorm
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module rendered from WHEN_ONLY_SPEC over the repository's _base, written to disk."""
    root = tmp_path_factory.mktemp("when_only")
    (root / "specs").mkdir()
    shutil.copy(REPO / "specs" / "_base.yaml", root / "specs" / "_base.yaml")
    (root / "specs" / "tiny.yaml").write_text(WHEN_ONLY_SPEC, encoding="utf-8")
    module = root / "generated" / "tiny.py"
    module.parent.mkdir()
    module.write_text(render_project(root)["generated/tiny.py"], encoding="utf-8")
    return module


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # MYPYPATH: mypy resolves bridgegen to this checkout, not to whichever one is installed.
    env = {**os.environ, "MYPYPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def test_conditions_read_the_config_and_hf_values_does_not(generated: Path) -> None:
    text = generated.read_text(encoding="utf-8")
    assert 'return bool(config.value("qk_layernorm"))' in text
    hf_values = text[text.index("def hf_values") :]
    assert "qk_layernorm" not in hf_values
    assert "add_qkv_bias" not in hf_values


def test_one_tensor_may_be_mapped_under_exclusive_conditions(generated: Path) -> None:
    text = generated.read_text(encoding="utf-8")
    assert text.count('hf_names=("model.layers.{layer}.self_attn.k_norm.weight",)') == 2


def test_ruff_finds_nothing(generated: Path) -> None:
    result = _run("ruff", "check", "--config", str(REPO / "pyproject.toml"), str(generated), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing(generated: Path, tmp_path: Path) -> None:
    result = _run(
        "mypy",
        "--strict",
        "--config-file",
        str(REPO / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / "mypy_cache"),
        str(generated),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
