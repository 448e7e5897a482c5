"""Every ``sh`` and ``python`` block of README.md and docs/*.md runs as written, in order, on
tiny random models saved under the names the page uses (``Llama-3.2-1B``, ``Qwen3-30B-A3B``,
``Acme-7B``); a ``yaml`` block whose first line is ``# <path>`` is written to that path first.
``text`` blocks show commands that need other tools (Megatron-LM, a GPU cluster) and are not
run. A stale snippet fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.S | re.M)
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(kind, body) for kind, body in BLOCK.findall(page.read_text(encoding="utf-8"))]


def save_model(folder: Path, kind: str, **config: object) -> None:
    """A tiny random model of transformers' ``kind``; ``architectures`` / ``model_type`` given
    in ``config`` are written into its config.json (a family transformers does not know)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = {key: value for key, value in config.items() if key not in ("architectures", "model_type")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **settings), dtype=torch.float32)
    model.save_pretrained(folder)
    if "architectures" in config or "model_type" in config:
        import json

        path = folder / "config.json"
        data = json.loads(path.read_text())
        data.update({key: config[key] for key in ("architectures", "model_type") if key in config})
        path.write_text(json.dumps(data))


def models(where: Path) -> None:
    from bridgegen.generated import Qwen3MoeBridge

    save_model(where / "Llama-3.2-1B", "llama", **TINY)
    moe = dict(Qwen3MoeBridge.example_hf_config())
    save_model(where / "Qwen3-30B-A3B", "qwen3_moe", **{k: v for k, v in moe.items() if k not in ("architectures", "model_type")})
    save_model(where / "Acme-7B", "llama", **TINY, architectures=["AcmeForCausalLM"], model_type="acme")


def test_the_pages_have_runnable_blocks() -> None:
    kinds = {kind for page in PAGES for kind, _ in blocks(page)}
    assert {"sh", "python", "text"} <= kinds
    assert kinds <= {"sh", "python", "text", "yaml"}, kinds


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_block_of_the_page_runs(page: Path, tmp_path: Path) -> None:
    runnable = [(kind, body) for kind, body in blocks(page) if kind in ("sh", "python", "yaml")]
    if not any(kind in ("sh", "python") for kind, _ in runnable):
        return
    models(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("BRIDGEGEN_BRIDGES", None)
    script = ["set -e"]
    for kind, body in runnable:
        if kind == "yaml":
            first = body.splitlines()[0]
            if first.startswith("# ") and first.endswith(".yaml"):
                target = tmp_path / first[2:].strip()
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(body)
            continue
        if kind == "sh":
            script.append(body)
        else:
            source = tmp_path / f"block{len(script)}.py"
            source.write_text(body)
            script.append(f"{sys.executable} {source.name}")
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
