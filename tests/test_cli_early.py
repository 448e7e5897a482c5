"""What the conversion commands refuse before torch is imported (``cli/early_checks.py``):
each case runs the command in a fresh process, which must end with one error line, exit 2,
and never have imported torch. How long these take is measured by bench/refusal_times.py,
not asserted here. Also: every option has help, ``bridgegen list`` is a table with a header,
one-process errors carry no ``rank 0:``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bridgegen.cli.main import build_parser, main

# Runs the command line's main() and says whether torch was loaded when it returned.
RUNNER = """
import json, sys
from bridgegen.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""

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
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def hf_folder(path: Path, **changes: Any) -> Path:
    """An HF folder as the early checks see it: its config.json and a (fake) weights file,
    which they never read."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**LLAMA, **changes}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def megatron_folder(
    path: Path, *iterations: str, tracker: str | None = "release", record: bool = True
) -> Path:
    """A Megatron-LM checkpoint root as the early checks see it: tracker, iteration folders
    with metadata.json, and bridgegen.json with the Megatron values of ``LLAMA``."""
    path.mkdir(parents=True)
    if tracker is not None:
        (path / "latest_checkpointed_iteration.txt").write_text(tracker)
    for name in iterations or ("release",):
        (path / name).mkdir()
        (path / name / "metadata.json").write_text("{}")
    if record:
        values = {"num_attention_heads": 4, "num_query_groups": 2, "num_layers": 2, "vocab_size": 250}
        (path / "bridgegen.json").write_text(json.dumps({"megatron_config": {"values": values}}))
    return path


def refusal(argv: list[str], **env: str) -> str:
    """The one error line of ``bridgegen ARGV`` in a fresh process; it must exit 2 without
    having imported torch."""
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,  # a hang guard only
    )
    assert done.stdout.strip(), f"the command did not return (a conversion error?):\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert result["code"] == 2, done.stderr
    assert not result["torch"], f"torch was imported before the refusal: {lines}"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"bridgegen {argv[0]}: error: "), lines[0]
    return lines[0].removeprefix(f"bridgegen {argv[0]}: error: ")


@pytest.fixture
def hf(tmp_path: Path) -> Path:
    return hf_folder(tmp_path / "hf")


@pytest.fixture
def megatron(tmp_path: Path) -> Path:
    return megatron_folder(tmp_path / "megatron", "release", "iter_0000010")


# ------------------------------------------------------------------------------ folders


def test_a_missing_hf_folder(tmp_path: Path) -> None:
    gone = tmp_path / "nowhere"
    assert refusal(["import", "--hf", str(gone), "--out", str(tmp_path / "out")]) == (
        f"{gone}: no such folder (--hf takes an HF model folder or a Hugging Face Hub id, org/name)"
    )


def test_an_hf_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert refusal(["import", "--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == (
        f"{tmp_path / 'empty' / 'config.json'}: no config.json in the HF folder"
    )


def test_a_file_given_as_hf_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    message = refusal(["import", "--hf", str(tmp_path / "file"), "--out", str(tmp_path / "out")])
    assert message.startswith(f"{tmp_path / 'file'}: not a folder")


def test_a_megatron_checkpoint_given_to_import(megatron: Path, tmp_path: Path) -> None:
    assert refusal(["import", "--hf", str(megatron), "--out", str(tmp_path / "out")]) == (
        f"{megatron}: this is a Megatron checkpoint, not an HF folder: use `bridgegen export --megatron "
        f"{megatron}` to convert it to HF"
    )


def test_a_megatron_checkpoint_given_to_verify_as_hf(megatron: Path) -> None:
    assert refusal(["verify", "--hf", str(megatron)]) == (
        f"{megatron}: this is a Megatron checkpoint, not an HF folder: pass it as --megatron, with --hf the "
        "HF model it is compared with"
    )


def test_an_hf_folder_given_to_export(hf: Path, tmp_path: Path) -> None:
    assert refusal(["export", "--megatron", str(hf), "--out", str(tmp_path / "out")]) == (
        f"{hf}: this is an HF folder, not a Megatron checkpoint: use `bridgegen import --hf {hf}` to convert "
        "it to Megatron"
    )


def test_a_missing_megatron_folder(tmp_path: Path) -> None:
    gone = tmp_path / "nowhere"
    assert refusal(["export", "--megatron", str(gone), "--out", str(tmp_path / "out")]) == (
        f"{gone}: no such checkpoint folder"
    )


def test_an_absent_iteration_lists_those_present(megatron: Path, hf: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert refusal(["export", "--megatron", str(megatron), "--out", out, "--iteration", "5"]) == (
        f"{megatron}: iteration 5 absent (no iter_0000005 folder); present: release, 10"
    )
    verify = ["verify", "--hf", str(hf), "--megatron", str(megatron), "--iteration", "7"]
    assert refusal(verify).startswith(f"{megatron}: iteration 7 absent")


def test_an_iteration_that_is_no_number(megatron: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert refusal(["export", "--megatron", str(megatron), "--out", out, "--iteration", "last"]) == (
        "--iteration 'last': neither an iteration number nor 'release'"
    )


def test_a_root_without_tracker_names_its_iterations(tmp_path: Path) -> None:
    root = megatron_folder(tmp_path / "m", "release", "iter_0000010", tracker=None)
    assert refusal(["export", "--megatron", str(root), "--out", str(tmp_path / "out")]) == (
        f"{root}: neither latest_checkpointed_iteration.txt nor metadata.json; it holds release, 10: pass "
        "--iteration or the folder itself"
    )


def test_an_unknown_family(megatron: Path, tmp_path: Path) -> None:
    message = refusal(
        ["export", "--megatron", str(megatron), "--out", str(tmp_path / "o"), "--family", "lama"]
    )
    assert message.startswith("--family 'lama': no such family; known: ")
    assert "llama" in message


def test_verify_options_of_a_megatron_checkpoint_need_one(hf: Path) -> None:
    assert refusal(["verify", "--hf", str(hf), "--iteration", "10"]) == (
        "--iteration describes a --megatron checkpoint; none is given"
    )
    assert refusal(["verify", "--hf", str(hf), "--family", "llama", "--hf-config", str(hf)]) == (
        "--family and --hf-config describe a --megatron checkpoint; none is given"
    )


def test_an_unknown_dtype(hf: Path, tmp_path: Path) -> None:
    assert refusal(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), "--dtype", "fp8"]) == (
        "--dtype 'fp8' is not a dtype; choose one of bf16, bfloat16, float16, float32, fp16, fp32"
    )
    assert refusal(["verify", "--hf", str(hf), "--dtype", "half"]).startswith("--dtype 'half' is not a dtype")


def test_a_revision_without_a_hub_id(hf: Path, tmp_path: Path) -> None:
    assert refusal(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), "--revision", "main"]) == (
        f"--revision main: for a Hugging Face Hub id (org/name); {hf} is not one"
    )


def test_a_config_no_bridge_serves(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf", architectures=["NoSuchForCausalLM"], model_type="no_such")
    message = refusal(["import", "--hf", str(folder), "--out", str(tmp_path / "out")])
    assert message.startswith("no bridge for architectures ['NoSuchForCausalLM'] / model_type 'no_such'")


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (["--tp", "3"], "--tp 3 does not divide the 4 attention heads"),
        (
            ["--tp", "4"],
            "--tp 4 does not divide the 2 key/value heads (query groups); each rank holds whole ones",
        ),
        (
            ["--pp", "3"],
            "--pp 3 does not divide the 2 layers (--first-stage-layers / --last-stage-layers give the first and "
            "last stages their own count)",
        ),
        (
            ["--pp", "2", "--vpp", "2"],
            "--vpp 2 does not divide the 1 layers of each of the 2 pipeline stages",
        ),
        (
            ["--pp", "2", "--first-stage-layers", "3"],
            "--first-stage-layers 3: more layers than the model's 2",
        ),
        (
            ["--pp", "3", "--first-stage-layers", "1", "--last-stage-layers", "1"],
            "--pp 3 with --first-stage-layers 1 --last-stage-layers 1: 0 layers remain for 1 middle stages",
        ),
        (
            ["--ep", "2"],
            "--ep 2: this model has no experts to split (expert parallelism is for mixture-of-experts models)",
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_a_layout_that_does_not_divide_the_model(
    layout: list[str], message: str, hf: Path, tmp_path: Path
) -> None:
    assert refusal(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), *layout]) == message


def test_the_vocabulary_rows_must_split_over_tp(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "hf", vocab_size=251)
    out = str(tmp_path / "out")
    assert refusal(["import", "--hf", str(folder), "--out", out, "--tp", "2"]) == (
        "--tp 2 does not divide the 251 vocabulary rows; pad them with --vocab-multiple 2 (or a multiple of it)"
    )
    args = build_parser().parse_args(
        ["import", "--hf", str(folder), "--out", out, "--tp", "2", "--vocab-multiple", "2"]
    )
    from bridgegen.cli.convert import before_any_work

    assert before_any_work("import", args) is None


def test_experts_must_split_over_ep(tmp_path: Path) -> None:
    folder = hf_folder(
        tmp_path / "hf",
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=3,
        num_experts_per_tok=2,
    )
    assert refusal(["import", "--hf", str(folder), "--out", str(tmp_path / "out"), "--ep", "2"]) == (
        "--ep 2 does not divide the 3 experts"
    )


def test_export_and_verify_check_the_layout_too(megatron: Path, hf: Path, tmp_path: Path) -> None:
    """Export reads the model from bridgegen.json (or --hf-config), verify from --hf."""
    out = str(tmp_path / "out")
    assert refusal(["export", "--megatron", str(megatron), "--out", out, "--tp", "3"]) == (
        "--tp 3 does not divide the 4 attention heads"
    )
    bare = megatron_folder(tmp_path / "bare", record=False)
    assert refusal(
        ["export", "--megatron", str(bare), "--out", out, "--hf-config", str(hf), "--pp", "3"]
    ).startswith("--pp 3 does not divide the 2 layers")
    assert refusal(["verify", "--hf", str(hf), "--megatron", str(megatron), "--tp", "3"]) == (
        "--tp 3 does not divide the 4 attention heads"
    )


def test_what_passes_the_early_checks(hf: Path, megatron: Path, tmp_path: Path) -> None:
    """Well-formed commands are left to the conversion."""
    from bridgegen.cli.convert import before_any_work

    out = str(tmp_path / "out")
    for argv in (
        ["import", "--hf", str(hf), "--out", out, "--tp", "2", "--pp", "2", "--dtype", "bf16"],
        ["import", "--hf", str(hf), "--out", out, "--pp", "2", "--first-stage-layers", "1"],
        ["export", "--megatron", str(megatron), "--out", out, "--iteration", "10", "--tp", "2"],
        ["export", "--megatron", str(megatron / "release"), "--out", out],
        [
            "verify",
            "--hf",
            str(hf),
            "--megatron",
            str(megatron),
            "--iteration",
            "release",
            "--family",
            "llama",
        ],
        ["verify", "--hf", str(hf), "--tp", "2", "--dtype", "float16"],
    ):
        assert before_any_work(argv[0], build_parser().parse_args(argv)) is None, argv


def test_the_dtype_names_are_those_of_the_conversion() -> None:
    from bridgegen.cli.early_checks import DTYPE_NAMES
    from bridgegen.plan.values import DTYPE_NAMES as CONVERSION_DTYPES

    assert sorted(DTYPE_NAMES) == sorted(CONVERSION_DTYPES)


def test_the_layout_names_are_those_of_the_conversion() -> None:
    from bridgegen.cli import early_checks
    from bridgegen.formats import megatron_checkpoint, megatron_lm

    assert early_checks.TRACKER_FILE == megatron_lm.TRACKER_FILE
    assert early_checks.RELEASE == megatron_lm.RELEASE
    assert early_checks.ITERATION_FOLDER.pattern == megatron_lm.ITERATION_PATTERN.pattern
    assert early_checks.RECORD_FILE == megatron_checkpoint.BRIDGE_FILE


# ------------------------------------------------------------------------------ the command line


def test_one_process_errors_say_no_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A conversion error found after the early checks (an unreadable weights file), in one
    process: ``bridgegen import: error: ...``, no ``rank 0:``."""
    folder = hf_folder(tmp_path / "hf")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--hf", str(folder), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"bridgegen import: error: {folder / 'model.safetensors'}: "), lines[0]


def test_every_option_has_help() -> None:
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, command in commands.choices.items()
        for action in command._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
    assert {"import", "export", "verify", "list", "generate", "check", "schema"} <= set(commands.choices)


def test_verify_takes_the_options_of_its_megatron_input() -> None:
    argv = ["verify", "--hf", "h", "--megatron", "m", "--iteration", "10", "--family", "llama"]
    args = build_parser().parse_args([*argv, "--hf-config", "c", "--dtype", "bf16"])
    assert (args.iteration, args.family, args.hf_config, args.dtype) == ("10", "llama", "c", "bf16")


def test_list_is_a_table_with_a_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["FAMILY", "ARCHITECTURES", "MODEL", "TYPES"]
    # Every row's columns start where the header's do, the longest entries included.
    starts = [lines[0].index("ARCHITECTURES"), lines[0].index("MODEL TYPES")]
    for line in lines[1:]:
        family, architectures, model_types = (part for part in line.split("  ") if part.strip())
        assert line.index(architectures.strip()) == starts[0], line
        assert line.index(model_types.strip(), starts[0]) == starts[1], line
    assert any(line.startswith("gemma3 ") for line in lines)
