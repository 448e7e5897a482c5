"""Time to the error: how long `python -m bridgegen ...` takes to refuse a wrong command line.

Every case is one a user meets in the first minutes (a folder given to the wrong command, a
layout that does not divide the model, a Hub id the cache does not hold); each must be
refused before torch or megatron-core is imported (``bridgegen/cli/early_checks.py``), in
well under the 3 s target. Each case runs in a fresh process, several times; the table shows
the median and the slowest wall time, and the error line.

Usage: python bench/refusal_times.py [--repeats 3]
This is a measurement, not a test: times depend on the machine and its page cache. The tests
(tests/test_cli_early.py) check the messages and that torch was not imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 250,
    "max_position_embeddings": 256,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def fixtures(root: Path) -> dict[str, Path]:
    """An HF folder (its weights are never read before the refusals), a Megatron checkpoint
    root with release/ and iter_0000010/, an empty folder and an empty Hub cache."""
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAMA))
    (hf / "model.safetensors").write_bytes(b"")
    megatron = root / "megatron"
    for name in ("release", "iter_0000010"):
        (megatron / name).mkdir(parents=True)
        (megatron / name / "metadata.json").write_text("{}")
    (megatron / "latest_checkpointed_iteration.txt").write_text("release")
    (root / "empty").mkdir()
    (root / "cache").mkdir()
    return {
        "hf": hf,
        "megatron": megatron,
        "empty": root / "empty",
        "cache": root / "cache",
        "out": root / "out",
    }


def cases(at: dict[str, Path]) -> list[tuple[str, list[str], dict[str, str]]]:
    hf, megatron, out = str(at["hf"]), str(at["megatron"]), str(at["out"])
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(at["cache"])}
    return [
        ("missing --hf folder", ["import", "--hf", str(at["empty"] / "nope"), "--out", out], {}),
        ("--hf folder without config.json", ["import", "--hf", str(at["empty"]), "--out", out], {}),
        ("Megatron checkpoint given to import", ["import", "--hf", megatron, "--out", out], {}),
        ("HF folder given to export", ["export", "--megatron", hf, "--out", out], {}),
        ("--iteration 5 absent", ["export", "--megatron", megatron, "--out", out, "--iteration", "5"], {}),
        ("--tp 3 with 4 heads (import)", ["import", "--hf", hf, "--out", out, "--tp", "3"], {}),
        ("--pp 3 over 2 layers (verify)", ["verify", "--hf", hf, "--pp", "3"], {}),
        ("--dtype fp8", ["import", "--hf", hf, "--out", out, "--dtype", "fp8"], {}),
        (
            "--family unknown (export)",
            ["export", "--megatron", megatron, "--out", out, "--family", "lama"],
            {},
        ),
        ("Hub id not cached, offline", ["import", "--hf", "meta-llama/Llama-3.2-1B", "--out", out], offline),
        (
            "Hub id not cached, Hub unreachable",
            ["import", "--hf", "meta-llama/Llama-3.2-1B", "--out", out],
            {"HF_HUB_CACHE": str(at["cache"])},
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (default 3)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridgegen-refusals-") as scratch:
        at = fixtures(Path(scratch))
        for name, argv, env in cases(at):
            times, said = [], ""
            for _ in range(args.repeats):
                start = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "bridgegen", *argv],
                    capture_output=True,
                    text=True,
                    env={**os.environ, **env},
                )
                times.append(time.perf_counter() - start)
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                said = f"[exit {done.returncode}] {lines[-1] if lines else ''}".replace(scratch, "TMP")
            rows.append((name, statistics.median(times), max(times), said))
    print(f"| case | median s | slowest s | error (of {args.repeats} runs) |")
    print("|---|---:|---:|---|")
    for name, median, slowest, said in rows:
        print(f"| {name} | {median:.2f} | {slowest:.2f} | {said.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
