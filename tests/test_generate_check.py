"""generate / check on a temporary copy of the repository's specs, and on the repository itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridgegen.spec.generate import check, render_project, write
from bridgegen.spec.render import GENERATED_PACKAGE_DIR, SCHEMA_PATH

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def repo_files() -> dict[str, str]:
    """What the repository's specs render to (rendered once: ruff runs once per file)."""
    return render_project(REPO)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root holding a copy of specs/ and an empty generated/."""
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    (tmp_path / GENERATED_PACKAGE_DIR).mkdir()
    return tmp_path


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridgegen", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_rendering_a_copy_gives_the_same_files(project: Path, repo_files: dict[str, str]) -> None:
    # Only the specs decide the output, not where the project lives.
    assert render_project(project) == repo_files


def test_generate_then_check_passes(project: Path, repo_files: dict[str, str]) -> None:
    assert not check(project, repo_files).ok
    written, deleted = write(project, repo_files)
    # The schema came with the copied specs/ and is up to date; every module is new.
    assert written == sorted(path for path in repo_files if path != SCHEMA_PATH)
    assert deleted == []
    result = check(project, repo_files)
    assert result.ok, result
    for path, text in repo_files.items():
        assert (project / path).read_text(encoding="utf-8") == text
    # A second write changes nothing.
    assert write(project, repo_files) == ([], [])


def test_check_reports_missing_file(project: Path, repo_files: dict[str, str]) -> None:
    write(project, repo_files)
    (project / GENERATED_PACKAGE_DIR / "llama.py").unlink()
    result = check(project, repo_files)
    assert not result.ok
    assert len(result.diffs) == 1
    assert result.diffs[0].startswith(
        f"--- {GENERATED_PACKAGE_DIR}/llama.py (on disk)\n+++ {GENERATED_PACKAGE_DIR}/llama.py (from specs)\n"
    )


def test_check_reports_an_edited_file_as_a_unified_diff(project: Path, repo_files: dict[str, str]) -> None:
    write(project, repo_files)
    target = project / GENERATED_PACKAGE_DIR / "llama.py"
    original = target.read_text(encoding="utf-8")
    assert '    family = "llama"\n' in original
    target.write_text(original.replace('    family = "llama"\n', '    family = "llama2"\n'), encoding="utf-8")

    result = check(project, repo_files)
    assert not result.ok
    assert result.orphans == []
    assert len(result.diffs) == 1
    diff = result.diffs[0]
    lines = diff.splitlines()
    assert lines[0] == f"--- {GENERATED_PACKAGE_DIR}/llama.py (on disk)"
    assert lines[1] == f"+++ {GENERATED_PACKAGE_DIR}/llama.py (from specs)"
    assert lines[2].startswith("@@ ")
    assert '-    family = "llama2"' in lines
    assert '+    family = "llama"' in lines
    assert sum(1 for line in lines[2:] if line[:1] in "+-") == 2

    written, deleted = write(project, repo_files)
    assert written == [f"{GENERATED_PACKAGE_DIR}/llama.py"]
    assert deleted == []
    assert check(project, repo_files).ok


def test_check_reports_a_stale_schema(project: Path, repo_files: dict[str, str]) -> None:
    write(project, repo_files)
    schema = project / SCHEMA_PATH
    schema.write_text(schema.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    result = check(project, repo_files)
    assert [d.splitlines()[0] for d in result.diffs] == [f"--- {SCHEMA_PATH} (on disk)"]


def test_orphan_is_reported_and_deleted_by_write(project: Path, repo_files: dict[str, str]) -> None:
    write(project, repo_files)
    orphan = project / GENERATED_PACKAGE_DIR / "orphan.py"
    orphan.write_text("# left over from a deleted spec\n", encoding="utf-8")
    keep = project / GENERATED_PACKAGE_DIR / "py.typed"
    keep.write_text("", encoding="utf-8")

    result = check(project, repo_files)
    assert result.diffs == []
    assert result.orphans == [f"{GENERATED_PACKAGE_DIR}/orphan.py"]
    assert not result.ok

    written, deleted = write(project, repo_files)
    assert written == []
    assert deleted == [f"{GENERATED_PACKAGE_DIR}/orphan.py"]
    assert not orphan.exists()
    assert keep.exists(), "write deletes only generated *.py files"
    assert check(project, repo_files).ok


def test_removing_a_spec_makes_its_module_an_orphan(project: Path, repo_files: dict[str, str]) -> None:
    write(project, repo_files)
    (project / "specs" / "phi3.yaml").unlink()
    files = render_project(project)
    assert f"{GENERATED_PACKAGE_DIR}/phi3.py" not in files
    result = check(project, files)
    assert result.orphans == [f"{GENERATED_PACKAGE_DIR}/phi3.py"]
    assert [d.splitlines()[0] for d in result.diffs] == [f"--- {GENERATED_PACKAGE_DIR}/__init__.py (on disk)"]
    assert write(project, files) == (
        [f"{GENERATED_PACKAGE_DIR}/__init__.py"],
        [f"{GENERATED_PACKAGE_DIR}/phi3.py"],
    )


def test_cli_check_with_root_reports_stale_code(project: Path, repo_files: dict[str, str]) -> None:
    write(project, repo_files)
    (project / GENERATED_PACKAGE_DIR / "orphan.py").write_text("", encoding="utf-8")
    result = _run_cli("check", "--root", str(project), cwd=project)
    assert result.returncode == 1
    assert f"{GENERATED_PACKAGE_DIR}/orphan.py: orphan generated file (no spec produces it)" in result.stdout
    assert "generated code is stale" in result.stderr

    result = _run_cli("generate", "--root", str(project), cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"deleted orphan {GENERATED_PACKAGE_DIR}/orphan.py" in result.stdout
    result = _run_cli("check", "--root", str(project), cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "specs valid; generated code up to date" in result.stdout


def test_cli_prints_spec_errors(project: Path) -> None:
    (project / "specs" / "broken.yaml").write_text("extends: _base\ncolour: red\n", encoding="utf-8")
    result = _run_cli("check", "--root", str(project), cwd=project)
    assert result.returncode == 1
    # A spec that fails validation is not resolved further, so only the unknown key is reported.
    assert result.stderr.splitlines() == [
        "specs/broken.yaml:2:1: colour: unknown key 'colour'",
        "1 spec error(s)",
    ]


def test_repository_check_passes() -> None:
    result = _run_cli("check", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "specs valid; generated code up to date"
    assert lines[-1] == "every HF config field accounted for"


def test_cli_check_builds_the_example_models(project: Path) -> None:
    """A weight rule deleted from Qwen3's spec: `bridgegen check` names the specs, the line of
    their example config and each parameter left without a rule, in Qwen3 and in Qwen3-MoE,
    which inherits the deletion (its dense first layer has the MLP)."""
    specs = project / "specs"
    text = (specs / "qwen3.yaml").read_text(encoding="utf-8")
    (specs / "qwen3.yaml").write_text(
        text.replace("weights:\n", "weights:\n  decoder.layers.{layer}.mlp.linear_fc2.weight: null\n", 1),
        encoding="utf-8",
    )
    assert _run_cli("generate", "--root", str(project), cwd=project).returncode == 0
    result = _run_cli("check", "--root", str(project), cwd=project)
    assert result.returncode == 1

    def example_line(name: str) -> int:
        return 1 + (specs / name).read_text(encoding="utf-8").splitlines().index("example_config:")

    missing = "'decoder.layers.{}.mlp.linear_fc2.weight' of the example model has no weight rule"
    assert result.stderr.splitlines() == [
        *(
            f"specs/qwen3.yaml:{example_line('qwen3.yaml')}:1: example_config: Megatron parameter "
            + missing.format(layer)
            for layer in (0, 1)
        ),
        f"specs/qwen3_moe.yaml:{example_line('qwen3_moe.yaml')}:1: example_config: Megatron parameter "
        + missing.format(0),
        "3 spec error(s)",
    ]
