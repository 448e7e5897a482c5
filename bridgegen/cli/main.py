"""The ``bridgegen`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bridgegen.spec.errors import FolderError, SpecErrors
from bridgegen.spec.render import GENERATED_PACKAGE_DIR, FormatterError

if TYPE_CHECKING:
    from bridgegen.spec.resolve import ResolvedSpec

DESCRIPTION = """\
bridgegen moves models between Hugging Face checkpoints and Megatron-Core.
Each architecture family is one YAML spec in specs/; `bridgegen generate` compiles the
specs into the typed bridge modules in generated/, and `bridgegen check` verifies that
generated/ is exactly what the specs produce (CI runs it).
Specs kept elsewhere: `bridgegen generate --specs DIR --out FOLDER`, then name FOLDER in
BRIDGEGEN_BRIDGES (folders separated by ':') for every command to find those bridges.
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


def _external_folders(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """``--specs`` and ``--out`` (given together, without ``--root``), or None for this project."""
    if args.specs is None and args.out is None:
        return None
    if args.specs is None or args.out is None:
        raise SystemExit("bridgegen: --specs and --out go together")
    if args.root is not None:
        raise SystemExit("bridgegen: --root is for this project's specs; not with --specs / --out")
    return Path(args.specs), Path(args.out)


@dataclass(frozen=True)
class _Rendered:
    """The specs a generate / check run is about, and the files they render to."""

    root: Path  # the files' paths are relative to it
    specs: list[ResolvedSpec]
    files: dict[str, str]
    generated_dir: str  # where bridges go, relative to root
    external: bool  # --specs / --out, not this project


def _rendered(args: argparse.Namespace) -> _Rendered:
    from bridgegen.spec.generate import load_external_project, load_project, spec_schema
    from bridgegen.spec.render import render_all, render_external

    external = _external_folders(args)
    if external is None:
        root = _project_root(args.root)
        project = load_project(root)
        files = render_all(project.specs, spec_schema(), project.modules)
        return _Rendered(root, project.specs, files, GENERATED_PACKAGE_DIR, False)
    specs_dir, root = external
    project = load_external_project(specs_dir, root)
    files = render_external(project.specs, root.resolve().name, project.modules)
    return _Rendered(root, project.specs, files, ".", True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from bridgegen.spec.generate import write

    rendered = _rendered(args)
    written, deleted = write(rendered.root, rendered.files, generated_dir=rendered.generated_dir)

    def shown(path: str) -> str:  # an external folder's files under the folder as given
        return str(rendered.root / path) if rendered.external else path

    for path in written:
        print(f"wrote {shown(path)}")
    for path in deleted:
        print(f"deleted orphan {shown(path)}")
    if not written and not deleted:
        print("generated code is up to date")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from bridgegen.spec.generate import check

    rendered = _rendered(args)
    result = check(rendered.root, rendered.files, generated_dir=rendered.generated_dir)
    for diff in result.diffs:
        sys.stdout.write(diff if diff.endswith("\n") else diff + "\n")
    for orphan in result.orphans:
        print(f"{orphan}: orphan generated file (no spec produces it)")
    if not result.ok:
        again = (
            "`bridgegen generate` with the same --specs / --out" if rendered.external else "`make generate`"
        )
        print(f"generated code is stale: run {again} and commit the result", file=sys.stderr)
        return 1
    from bridgegen.megatron.rule_check import example_models_errors

    model_errors = example_models_errors(rendered.specs, rendered.files, rendered.generated_dir)
    if model_errors:
        raise SpecErrors(model_errors)
    print("specs valid; generated code up to date")
    return _check_field_coverage(rendered.specs)


def _check_field_coverage(specs: list[ResolvedSpec]) -> int:
    """Every field of transformers' config classes is accounted for by the specs."""
    from bridgegen.spec.coverage import field_coverage

    problems, notes = field_coverage(specs)
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
    from bridgegen.bridge.errors import BridgeError
    from bridgegen.plan.bridges import all_bridges

    try:
        bridges = sorted(all_bridges(), key=lambda b: b.family)
    except BridgeError as exc:
        print(f"bridgegen list: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        rows = [
            {
                "family": b.family,
                "architectures": list(b.architectures),
                "model_types": list(b.model_types),
                "module": b.__module__,
            }
            for b in bridges
        ]
        print(json.dumps(rows, indent=2))
        return 0
    table = [("FAMILY", "ARCHITECTURES", "MODEL TYPES")]
    table += [(b.family, ", ".join(b.architectures), ", ".join(b.model_types)) for b in bridges]
    widths = [max(len(row[column]) for row in table) for column in range(2)]
    for family, architectures, model_types in table:
        print(f"{family:<{widths[0]}}  {architectures:<{widths[1]}}  {model_types}")
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

    def add_generating(name: str, help_text: str) -> argparse.ArgumentParser:
        p = add(name, help_text)
        p.add_argument("--specs", help="a folder of specs kept outside this project (with --out)")
        p.add_argument(
            "--out", help="the folder their bridges go to, a Python package (see BRIDGEGEN_BRIDGES)"
        )
        return p

    add_generating(
        "generate", "regenerate generated/ and the spec JSON Schema from specs/*.yaml"
    ).set_defaults(func=_cmd_generate)
    add_generating("check", "fail with a diff if generated/ differs from what specs/ produce").set_defaults(
        func=_cmd_check
    )
    p = sub.add_parser(
        "list",
        help="list families with the HF architectures and model types they serve",
        description="list the built-in bridges and those of the folders BRIDGEGEN_BRIDGES names",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_list)
    add("schema", "print the JSON Schema of the spec format").set_defaults(func=_cmd_schema)

    from bridgegen.cli.convert import add_conversion_commands

    add_conversion_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from bridgegen.engines.progress import quiet_third_party

    quiet_third_party()  # this process is ours: BRIDGEGEN_SHOW_WARNINGS=1 shows their notices
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SpecErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{len(exc.errors)} spec error(s)", file=sys.stderr)
        return 1
    except (FormatterError, FolderError) as exc:
        print(f"bridgegen: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
