"""Regenerate tests/golden/expected/ from tests/golden/specs/ (``make golden``).

The expected files are what ``render_project`` makes of the golden specs, one file per rendered
path (``generated/tiny.py``, ``generated/__init__.py`` and the JSON Schema). Review the diff
before committing: it is the change the generator's edit makes to every generated module.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from bridgegen.spec.generate import render_project

GOLDEN_DIR = Path(__file__).resolve().parent
SPECS_DIR = "specs"
EXPECTED_DIR = GOLDEN_DIR / "expected"


def render_golden() -> dict[str, str]:
    """``{relative path: text}`` rendered from the golden specs."""
    return render_project(GOLDEN_DIR, SPECS_DIR)


def main() -> int:
    files = render_golden()
    if EXPECTED_DIR.exists():
        shutil.rmtree(EXPECTED_DIR)
    for relative, text in sorted(files.items()):
        target = EXPECTED_DIR / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        print(f"wrote {target.relative_to(GOLDEN_DIR.parent.parent).as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
