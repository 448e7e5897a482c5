"""Every folder under tests/bad_specs/ is a set of bad specs and the exact errors they must give.

A case folder holds one or more ``*.yaml`` specs (often a copy of a minimal valid ``_base.yaml``
plus the bad spec) and ``expected.txt``: every error line of the run, sorted, as the CLI prints
them, with paths relative to the case folder.

Two optional files mark a case that exercises a known bridgegen bug:

* ``bug.txt``: the bug, described; ``expected.txt`` was written by hand with the correct output,
  so the test fails until the bug is fixed. Delete ``bug.txt`` once it is.
* ``xfail.txt``: the same, but the test is a strict xfail (its first line is the reason).

Set ``BRIDGEGEN_REFRESH_EXPECTED=1`` to rewrite ``expected.txt`` from the current output (cases
with ``bug.txt`` or ``xfail.txt`` are left alone). Read every rewritten file before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridgegen.megatron.rule_check import example_models_errors
from bridgegen.spec.errors import SpecErrors
from bridgegen.spec.generate import load_specs, spec_schema
from bridgegen.spec.render import render_all

CASES_DIR = Path(__file__).parent / "bad_specs"
REFRESH = os.environ.get("BRIDGEGEN_REFRESH_EXPECTED") == "1"


def _case_dirs() -> list[Path]:
    return sorted(p for p in CASES_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def _params() -> list[object]:
    params: list[object] = []
    for case in _case_dirs():
        marks = []
        xfail = case / "xfail.txt"
        if xfail.exists():
            reason = xfail.read_text(encoding="utf-8").splitlines()[0]
            marks.append(pytest.mark.xfail(reason=reason, strict=True))
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


def spec_error_lines(case: Path) -> list[str]:
    """The error lines a case produces (empty if its specs load without errors): those of
    loading its specs, or, when they load, those of building their example models (as
    `bridgegen check` does)."""
    try:
        specs = load_specs(case, ".")
        errors = example_models_errors(specs, render_all(specs, spec_schema()))
    except SpecErrors as exc:
        return [str(error) for error in exc.errors]
    return [str(error) for error in sorted(set(errors))]


@pytest.mark.parametrize("case", _params())
def test_bad_spec_case(case: Path) -> None:
    actual = spec_error_lines(case)
    expected_file = case / "expected.txt"
    is_known_bug = (case / "bug.txt").exists() or (case / "xfail.txt").exists()
    if REFRESH and not is_known_bug:
        expected_file.write_text("".join(line + "\n" for line in actual), encoding="utf-8")
    assert actual, f"{case.name}: the specs loaded without any error"
    expected = expected_file.read_text(encoding="utf-8").splitlines()
    assert actual == expected


def test_there_are_enough_cases() -> None:
    assert len(_case_dirs()) >= 22
    for case in _case_dirs():
        assert (case / "expected.txt").is_file(), f"{case.name} has no expected.txt"


def test_errors_of_two_files_are_both_reported() -> None:
    lines = spec_error_lines(CASES_DIR / "errors_in_two_files")
    files = {line.split(":", 1)[0] for line in lines}
    assert files == {"one.yaml", "two.yaml"}


def test_expected_paths_are_relative() -> None:
    for case in _case_dirs():
        for line in (case / "expected.txt").read_text(encoding="utf-8").splitlines():
            assert not line.startswith("/"), f"{case.name}: absolute path in {line!r}"
            spec_file = line.split(":", 1)[0]
            assert (case / spec_file).is_file(), f"{case.name}: {spec_file} is not a spec of the case"


def test_spec_errors_are_sorted_and_unique() -> None:
    with pytest.raises(SpecErrors) as info:
        load_specs(CASES_DIR / "inheritance_cycle", ".")
    errors = info.value.errors
    assert errors == sorted(set(errors))
    assert str(info.value) == "\n".join(str(e) for e in errors)
