"""The ``bridgegen`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bridgegen.spec.errors import SpecErrors
from bridgegen.spec.render import FormatterError

DESCRIPTION = """\
bridgegen moves models between Hugging Face checkpoints and Megatron-Core.
Each architecture family is one YAML spec in specs/; `bridgegen generate` compiles the
specs into the typed bridge modules in generated/, and `bridgegen check` verifies that
generated/ is exactly what the specs produce (CI runs it).
"""


def _project_root(value: str | None) -> Path:
    if value:
        return Path(value).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "specs").is_dir() and (candidate / "pyproject.toml").is_file():
            return candidate
    raise SystemExit(
        "bridgegen: no project root found (a folder with specs/ and pyproject.toml); pass --root"
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from bridgegen.spec.generate import render_project, write

    root = _project_root(args.root)
    written, deleted = write(root, render_project(root))
    for path in written:
        print(f"wrote {path}")
    for path in deleted:
        print(f"deleted orphan {path}")
    if not written and not deleted:
        print("generated code is up to date")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from bridgegen.spec.generate import check, render_project

    root = _project_root(args.root)
    result = check(root, render_project(root))
    for diff in result.diffs:
        sys.stdout.write(diff if diff.endswith("\n") else diff + "\n")
    for orphan in result.orphans:
        print(f"{orphan}: orphan generated file (no spec produces it)")
    if not result.ok:
        print("generated code is stale: run `make generate` and commit the result", file=sys.stderr)
        return 1
    print("specs valid; generated code up to date")
    return _check_field_coverage(root)


def _check_field_coverage(root: Path) -> int:
    """Every field of transformers' config classes is accounted for by the specs."""
    from bridgegen.spec.coverage import field_coverage
    from bridgegen.spec.generate import load_specs

    problems, notes = field_coverage(load_specs(root))
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} HF config field(s) not accounted for by the specs", file=sys.stderr)
        return 1
    print("every HF config field accounted for")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from bridgegen.spec.generate import load_specs

    specs = load_specs(_project_root(args.root))
    if args.json:
        rows = [
            {"family": s.family, "architectures": list(s.architectures), "model_types": list(s.model_types)}
            for s in specs
        ]
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(s.family) for s in specs)
    for spec in specs:
        print(f"{spec.family:<{width}}  {', '.join(spec.architectures):<40}  {', '.join(spec.model_types)}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from bridgegen.spec.generate import spec_schema

    print(json.dumps(spec_schema(), indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bridgegen", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--root", help="project root holding specs/ (default: found from the current folder)")
        return p

    add("generate", "regenerate generated/ and the spec JSON Schema from specs/*.yaml").set_defaults(
        func=_cmd_generate
    )
    add("check", "fail with a diff if generated/ differs from what specs/ produce").set_defaults(
        func=_cmd_check
    )
    p = add("list", "list families with the HF architectures and model types they serve")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_list)
    add("schema", "print the JSON Schema of the spec format").set_defaults(func=_cmd_schema)

    from bridgegen.convert_cli import add_conversion_commands

    add_conversion_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SpecErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{len(exc.errors)} spec error(s)", file=sys.stderr)
        return 1
    except FormatterError as exc:
        print(f"bridgegen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
