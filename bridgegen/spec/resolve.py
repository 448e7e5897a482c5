"""Stages 2-3: validate loaded specs (pydantic), check across specs, and resolve inheritance.

The output, ``ResolvedSpec``, is shaped for generation: every expression is parsed and
name-checked, every name is final, and nothing is left to look up. All errors of a run are
collected; one bad spec never hides the errors of another.

Inheritance (``extends``) merges each spec's sections over what it inherits, base first:

* An entry replaces the inherited entry of the same key, and ``null`` deletes it, in every
  keyed section but ``hf_optional`` (where null is the value None that an absent field takes).
  A null with nothing inherited to delete is an error. A field is set to None by the expression
  ``"None"`` in ``to_megatron`` or ``to_hf``.
* A field takes its value from the most derived spec that sets it, whichever section does: a
  rename, ``to_megatron`` or ``megatron_defaults`` entry for a Megatron field; a rename,
  ``to_hf`` or ``hf_defaults`` entry for an HF field. So a family may map a field its base fixes,
  or fix one its base maps; the inherited entry goes. A rename sets one field of each side, so
  setting either again drops the inherited rename whole.
* Two entries of one spec setting the same field are a conflict, inherited or not.
* ``hf_neutral`` and ``hf_behaviour_free`` account for HF fields the bridge does not read. An
  inherited entry for a field the family reads goes (it maps what its base refused or ignored);
  an entry for a field its own spec reads is an error.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from bridgegen.bridge.config import MODEL_FIELDS
from bridgegen.bridge.module_parameters import (
    BUILTIN_MODULES,
    ModuleParameters,
    parameter_names,
    parameter_type_error,
)
from bridgegen.bridge.weight_rules import HF_ARITY, TRANSPOSABLE_KINDS, GateUp, HFLayout, WeightKind
from bridgegen.spec.errors import Location, SpecError, SpecErrors
from bridgegen.spec.expr import ExpressionError, check_names, emit_python, parse_expression, variable_name
from bridgegen.spec.loader import FieldPath, LoadedSpec
from bridgegen.spec.megatron_fields import config_fields
from bridgegen.spec.models import ConfigSection, SpecFile, WeightSpec

# Anything between braces is a placeholder, so that a misspelt one ({Layer}, {0}) is an error
# rather than literal text in a tensor name that no checkpoint ever has.
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
KNOWN_PLACEHOLDERS = frozenset({"layer", "expert"})
# hf_copies may also number the multi-token prediction layers each copy is written for.
COPY_PLACEHOLDERS = KNOWN_PLACEHOLDERS | {"mtp_layer"}
# "Did you mean" suggestions per spec, for unknown Megatron fields.
MAX_SUGGESTIONS = 20


@dataclass(frozen=True)
class HFInput:
    """An HF config field read on import: required, or optional with a default."""

    hf_name: str
    variable: str
    required: bool
    default: Any


@dataclass(frozen=True)
class Assignment:
    """``target = python_source`` in generated code."""

    target: str
    python: str


@dataclass(frozen=True)
class ResolvedWeight:
    megatron_name: str
    te_megatron_name: str | None
    hf_names: tuple[str, ...]
    kind: WeightKind
    when_python: str | None
    norm_offset: float
    hf_stacked_experts: bool
    hf_copies: tuple[str, ...]
    location: Location | None = None  # where the spec writes this weight
    hf_layout: HFLayout = HFLayout.same
    gate_up: GateUp = GateUp.stacked
    value: float = 0.0
    shares_hf_with: str | None = None


@dataclass(frozen=True)
class ResolvedWrapper:
    architecture: str
    config: str
    weight_prefix: str
    carried_weights: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedSpec:
    family: str
    source: str
    class_name: str
    description: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    wrappers: tuple[ResolvedWrapper, ...]
    megatron_model: str
    activation_field: str
    activation_default: str | None
    activations: tuple[tuple[str, str], ...]
    hf_checks: tuple[tuple[str, str], ...]  # (python condition over hf_* variables, message)
    rope_types: tuple[str, ...]
    hf_inputs: tuple[HFInput, ...]
    megatron_values: tuple[Assignment, ...]  # megatron_name = python over hf_* variables
    megatron_inputs: tuple[tuple[str, str], ...]  # (variable, megatron_name) hf_values reads
    hf_values: tuple[Assignment, ...]  # hf_name = python over m_* variables
    weights: tuple[ResolvedWeight, ...]
    hf_ignore: tuple[str, ...]
    extra_fields: tuple[str, ...]
    runtime_modules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # module, (parameter, field)
    # (module to import from, or "" for the bridges folder's own runtime_modules; class name)
    runtime_module_classes: tuple[tuple[str, str], ...]
    hf_aliases: tuple[tuple[str, tuple[str, ...]], ...]
    example_config: tuple[tuple[str, Any], ...] = ()
    hf_neutral: tuple[tuple[str, tuple[Any, ...], str], ...] = ()  # (HF field, its supported values, why)
    hf_behaviour_free: tuple[str, ...] = ()
    model_type_lines: tuple[tuple[str, str], ...] = ()  # (model type, "spec file:line" declaring it)
    example_config_location: Location | None = None


# HF fields every bridge reads besides its spec's entries: the RoPE block and the model's identity.
ALWAYS_READ_HF_FIELDS = frozenset({"rope_scaling", "rope_parameters", "architectures", "model_type"})


def mapped_hf_fields(
    hf_inputs: Iterable[HFInput],
    hf_values: Iterable[Assignment],
    activation_field: str,
    hf_aliases: Iterable[tuple[str, Iterable[str]]],
) -> frozenset[str]:
    """Every HF field a bridge maps (read on import or written on export)."""
    names = {field.hf_name for field in hf_inputs} | {value.target for value in hf_values}
    names |= {alias for _, aliases in hf_aliases for alias in aliases}
    return frozenset(names | {activation_field} | ALWAYS_READ_HF_FIELDS)


def placeholders_of(template: str) -> frozenset[str]:
    return frozenset(PLACEHOLDER.findall(template))


def placeholder_problems(
    template: str, known: frozenset[str], reported: frozenset[str] = frozenset()
) -> list[str]:
    """What is wrong with the placeholders of a tensor name template: a brace outside a
    ``{name}`` pair, or names not in ``known`` (nor in ``reported``: unknown names of the
    weight's Megatron name, already reported there)."""
    outside = PLACEHOLDER.sub("", template)
    if "{" in outside or "}" in outside:
        return [f"unbalanced brace in {template!r}; a placeholder is written {{name}}"]
    listed = ", ".join(f"{{{name}}}" for name in sorted(known))
    return [
        f"unknown placeholder {{{name}}} in {template!r}; known: {listed}"
        for name in sorted(placeholders_of(template) - known - reported)
    ]


def _first_carried_clash(carried: str, prefix: str, sorted_names: list[str]) -> str | None:
    """The first of ``sorted_names`` that ``carried`` would carry once ``prefix`` is put in
    front of it. Bisection keeps checking every carried prefix against every tensor n log n."""
    if prefix.startswith(carried):
        return sorted_names[0] if sorted_names else None
    if not carried.startswith(prefix):
        return None
    rest = carried[len(prefix) :]
    index = bisect.bisect_left(sorted_names, rest)
    if index < len(sorted_names) and sorted_names[index].startswith(rest):
        return sorted_names[index]
    return None


def _double_mappings(weights: list[ResolvedWeight]) -> list[tuple[ResolvedWeight, str, str, bool]]:
    """Rules mapping an HF tensor that an earlier rule maps too, where both can apply at once:
    (rule, HF tensor, the earlier rule's Megatron name, whether both have the same condition).

    Two rules clash when either has no condition or both have the same one (compared as the
    emitted Python, so spacing and parentheses do not matter). Different conditions are taken
    to exclude each other (``q_lora_rank is None`` / ``q_lora_rank is not None``): whether two
    of them can hold together depends on values only a config has."""
    # HF tensor -> condition (None: unconditional) -> the first rule mapping it under that condition.
    first: dict[str, dict[str | None, str]] = {}
    found: list[tuple[ResolvedWeight, str, str, bool]] = []
    for weight in weights:
        if weight.shares_hf_with is not None:
            continue  # a declared second reader of its rule's HF tensor
        for hf_name in (*weight.hf_names, *weight.hf_copies):
            earlier = first.setdefault(hf_name, {})
            condition = weight.when_python
            if condition is None and earlier:
                found.append((weight, hf_name, next(iter(earlier.values())), False))
            elif None in earlier:
                found.append((weight, hf_name, earlier[None], False))
            elif condition in earlier:
                found.append((weight, hf_name, earlier[condition], True))
            earlier.setdefault(condition, weight.megatron_name)
    return found


def _remove_inherited(merged: _Merged, cfg: ConfigSection, loaded: LoadedSpec) -> list[SpecError]:
    """Drop the list entries ``config.remove`` names from what the specs extended hold."""
    errors: list[SpecError] = []
    for index, expect in enumerate(cfg.remove.hf_checks):
        kept = [check for check in merged.hf_checks if check[0] != expect]
        if len(kept) == len(merged.hf_checks):
            errors.append(
                loaded.error(
                    ("config", "remove", "hf_checks", index),
                    f"no hf_checks entry of the specs this one extends expects {expect!r}",
                )
            )
        merged.hf_checks = kept
    for section in ("hf_behaviour_free", "extra_fields"):
        entries: dict[str, _Origin] = getattr(merged, section)
        for index, name in enumerate(getattr(cfg.remove, section)):
            if entries.pop(name, None) is None:
                errors.append(
                    loaded.error(
                        ("config", "remove", section, index),
                        f"no {section} entry {name!r} in the specs this one extends",
                    )
                )
    return errors


def _sharing_problem(megatron_name: str, weight: WeightSpec, shared: WeightSpec | None) -> str | None:
    """What is wrong with ``weight`` repeating the HF tensor of the rule ``shares_hf_with`` names."""
    if shared is None:
        return f"no weight rule {weight.shares_hf_with!r} to share the HF tensor of"
    if weight.shares_hf_with == megatron_name:
        return "a rule cannot share its own HF tensor"
    if weight.hf:
        return f"takes its HF tensor from {weight.shares_hf_with!r}; leave hf out"
    if shared.shares_hf_with is not None:
        return f"{weight.shares_hf_with!r} shares an HF tensor itself; name the rule that maps it"
    if shared.kind is not weight.kind or weight.kind is WeightKind.constant:
        return f"kind {weight.kind.value!r} differs from {shared.kind.value!r} of {weight.shares_hf_with!r}"
    if placeholders_of(megatron_name) != placeholders_of(str(weight.shares_hf_with)):
        return f"{megatron_name!r} and {weight.shares_hf_with!r} must use the same placeholders"
    if (shared.hf_layout, shared.hf_stacked_experts, shared.gate_up) != (
        weight.hf_layout,
        weight.hf_stacked_experts,
        weight.gate_up,
    ):
        return f"hf_layout, hf_stacked_experts and gate_up must be those of {weight.shares_hf_with!r}"
    if weight.hf_copies or weight.norm_offset != shared.norm_offset:
        return f"norm_offset must be that of {weight.shares_hf_with!r}, and hf_copies are the other rule's"
    return None


def class_name_for(family: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[_\-]", family) if part) + "Bridge"


# ---------------------------------------------------------------- validation (per file)


def _data_path(data: Any, loc: Iterable[str | int]) -> FieldPath:
    """Keep only the parts of a pydantic error location that exist in the data (drops union tags)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and not out[-1:] == [part]:
            # An unknown key (extra_forbidden) is reported at the key itself.
            if part not in node:
                continue
    return tuple(out)


def _pydantic_message(error: Any, data_path: FieldPath, loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}"
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    return str(error["msg"])


def validate_file(loaded: LoadedSpec) -> tuple[SpecFile | None, list[SpecError]]:
    if not isinstance(loaded.data, dict):
        return None, [loaded.error((), "a spec must be a mapping at the top level")]
    try:
        return SpecFile.model_validate(loaded.data), []
    except ValidationError as exc:
        errors: dict[tuple[FieldPath, str], SpecError] = {}
        for error in exc.errors():
            loc = tuple(error["loc"])
            path = _data_path(loaded.data, loc)
            message = _pydantic_message(error, path, loc)
            if error["type"] == "extra_forbidden":
                path = (*path, loc[-1]) if loc[-1] not in path[-1:] else path
            key = (path, message)
            errors.setdefault(key, loaded.error(path, message))
        # A union field reports one error per member; keep one per field path, and drop an
        # error on a path when a deeper one explains it (a bad item of a list-or-string field).
        # Collecting every proper prefix once keeps this linear in the number of errors.
        by_path: dict[FieldPath, SpecError] = {}
        for (path, _), err in errors.items():
            by_path.setdefault(path, err)
        explained = {path[:cut] for path in by_path for cut in range(len(path))}
        return None, [err for path, err in by_path.items() if path not in explained]


# ---------------------------------------------------------------- merging (extends)


@dataclass(frozen=True)
class _Origin:
    loaded: LoadedSpec
    path: FieldPath

    def error(self, message: str, suffix: FieldPath = ()) -> SpecError:
        return self.loaded.error((*self.path, *suffix), message)


@dataclass
class _Merged:
    """Dict sections merged along the extends chain, each entry with where it came from."""

    renames: dict[str, tuple[str, _Origin]]
    hf_optional: dict[str, tuple[Any, _Origin]]
    hf_required: dict[str, _Origin]
    to_megatron: dict[str, tuple[str, _Origin]]
    to_hf: dict[str, tuple[str, _Origin]]
    megatron_defaults: dict[str, tuple[Any, _Origin]]
    hf_defaults: dict[str, tuple[Any, _Origin]]
    activations: dict[str, tuple[str, _Origin]]
    weights: dict[str, tuple[Any, _Origin]]
    hf_ignore: dict[str, _Origin]
    hf_aliases: dict[str, tuple[list[str], _Origin]]
    extra_fields: dict[str, _Origin]
    runtime_modules: dict[str, tuple[dict[str, str], _Origin]]  # module: ({parameter: field}, origin)
    hf_checks: list[tuple[str, str, _Origin]]
    activation_default: str | None
    megatron_model: str | None
    activation_field: str | None
    rope_types: tuple[str, ...] | None
    description: str
    depth: dict[str, int] = field(default_factory=dict)  # spec file -> place in the extends chain
    hf_neutral: dict[str, tuple[Any, _Origin]] = field(default_factory=dict)
    hf_behaviour_free: dict[str, _Origin] = field(default_factory=dict)

    def in_chain_order(self, entries: Iterable[tuple[str, _Origin]]) -> list[tuple[str, _Origin]]:
        """Entries base spec first (keeping their order within a spec), so a conflict is
        reported at the entry of the spec that extends, naming the inherited one."""
        return sorted(entries, key=lambda e: self.depth.get(e[1].loaded.path, 0))


def _merge_section(
    target: dict[str, tuple[Any, _Origin]],
    entries: dict[str, Any],
    loaded: LoadedSpec,
    base: FieldPath,
    errors: list[SpecError],
) -> None:
    """Add one spec's entries to a merged section; a null entry deletes the inherited one."""
    for key, value in entries.items():
        origin = _Origin(loaded, (*base, key))
        if value is not None:
            target[key] = (value, origin)
        elif target.pop(key, None) is None:
            # A null that deletes nothing is a misspelt key, or an override its base outgrew.
            errors.append(origin.error("null deletes an inherited entry, and there is none to delete"))


@dataclass(frozen=True)
class _Claim:
    """A config entry setting a field: ``side`` is "Megatron" (set on import) or "HF" (written
    on export). A rename makes two claims, one per side."""

    side: str
    name: str
    origin: _Origin


def _claims(loaded: LoadedSpec, cfg: ConfigSection) -> list[_Claim]:
    """The fields one spec file's config sets, in the order its conflicts are reported: renames,
    then expressions, then fixed values, each by key. Null entries delete and set nothing."""

    def set_by(entries: dict[str, Any]) -> dict[str, str]:
        return {key: key for key, value in entries.items() if value is not None}

    renames = {hf: megatron for hf, megatron in cfg.renames.items() if megatron is not None}
    sections = (  # (side, section, {entry key: field it sets})
        ("Megatron", "renames", renames),
        ("Megatron", "to_megatron", set_by(cfg.to_megatron)),
        ("Megatron", "megatron_defaults", set_by(cfg.megatron_defaults)),
        ("HF", "renames", set_by(renames)),
        ("HF", "to_hf", set_by(cfg.to_hf)),
        ("HF", "hf_defaults", set_by(cfg.hf_defaults)),
    )
    return [
        _Claim(side, name, _Origin(loaded, ("config", section, key)))
        for side, section, fields in sections
        for key, name in sorted(fields.items())
    ]


def _conflicts(claims: list[_Claim]) -> list[SpecError]:
    """Fields one spec sets twice: within a file neither entry can replace the other."""
    first: dict[tuple[str, str], _Origin] = {}
    errors: list[SpecError] = []
    for claim in claims:
        earlier = first.setdefault((claim.side, claim.name), claim.origin)
        if earlier is not claim.origin:
            errors.append(
                claim.origin.error(
                    f"conflicting definitions of {claim.side} field {claim.name!r}: "
                    f"also set at {earlier.loaded.location_of(earlier.path)}"
                )
            )
    return errors


def _drop_replaced(merged: _Merged, claims: list[_Claim], loaded: LoadedSpec) -> None:
    """Delete the inherited entries for the fields ``loaded`` sets, whatever section they are in:
    a family that maps a field its base fixes (or fixes one its base maps) replaces the base's
    entry. A rename is one entry for two fields, so setting either of them again drops it whole;
    its other field is then set only where some other entry sets it."""
    megatron = {claim.name for claim in claims if claim.side == "Megatron"}
    hf = {claim.name for claim in claims if claim.side == "HF"}
    merged.renames = {
        hf_name: (megatron_name, origin)
        for hf_name, (megatron_name, origin) in merged.renames.items()
        if origin.loaded is loaded or (hf_name not in hf and megatron_name not in megatron)
    }
    sections = (
        (merged.to_megatron, megatron),
        (merged.megatron_defaults, megatron),
        (merged.to_hf, hf),
        (merged.hf_defaults, hf),
    )
    for section, names in sections:
        for name in names & section.keys():
            if section[name][1].loaded is not loaded:
                del section[name]


def _merge_chain(chain: list[tuple[LoadedSpec, SpecFile]]) -> tuple[_Merged, list[SpecError]]:
    merged = _Merged({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, [], None, None, None, None, "")
    errors: list[SpecError] = []
    for depth, (loaded, spec) in enumerate(chain):
        merged.depth[loaded.path] = depth
        cfg = spec.config
        _merge_section(merged.renames, cfg.renames, loaded, ("config", "renames"), errors)
        # null is a value here (the field's value when absent), so wrap values to keep it.
        _merge_section(
            merged.hf_optional,
            {k: ("__present__", v) for k, v in cfg.hf_optional.items()},
            loaded,
            ("config", "hf_optional"),
            errors,
        )
        for index, name in enumerate(cfg.hf_required):
            merged.hf_required[name] = _Origin(loaded, ("config", "hf_required", index))
        _merge_section(merged.to_megatron, cfg.to_megatron, loaded, ("config", "to_megatron"), errors)
        _merge_section(merged.to_hf, cfg.to_hf, loaded, ("config", "to_hf"), errors)
        _merge_section(
            merged.megatron_defaults, cfg.megatron_defaults, loaded, ("config", "megatron_defaults"), errors
        )
        _merge_section(merged.hf_defaults, cfg.hf_defaults, loaded, ("config", "hf_defaults"), errors)
        claims = _claims(loaded, cfg)
        errors += _conflicts(claims)
        _drop_replaced(merged, claims, loaded)
        _merge_section(
            merged.activations,
            {k: (v.value if v is not None else None) for k, v in spec.activations.items()},
            loaded,
            ("activations",),
            errors,
        )
        _merge_section(merged.weights, dict(spec.weights), loaded, ("weights",), errors)
        for index, name in enumerate(spec.hf_ignore):
            merged.hf_ignore[name] = _Origin(loaded, ("hf_ignore", index))
        _merge_section(merged.hf_aliases, dict(cfg.hf_aliases), loaded, ("config", "hf_aliases"), errors)
        errors += _remove_inherited(merged, cfg, loaded)
        for index, name in enumerate(cfg.extra_fields):
            merged.extra_fields[name] = _Origin(loaded, ("config", "extra_fields", index))
        _merge_section(
            merged.runtime_modules,
            dict(spec.runtime_modules),
            loaded,
            ("runtime_modules",),
            errors,
        )
        _merge_section(merged.hf_neutral, dict(cfg.hf_neutral), loaded, ("config", "hf_neutral"), errors)
        for index, name in enumerate(cfg.hf_behaviour_free):
            merged.hf_behaviour_free[name] = _Origin(loaded, ("config", "hf_behaviour_free", index))
        for index, check in enumerate(cfg.hf_checks):
            merged.hf_checks.append(
                (check.expect, check.message, _Origin(loaded, ("config", "hf_checks", index, "expect")))
            )
        if spec.activation_default is not None:
            merged.activation_default = spec.activation_default
        if spec.megatron_model is not None:
            merged.megatron_model = spec.megatron_model.value
        if spec.activation_field is not None:
            merged.activation_field = spec.activation_field
        if spec.rope is not None:
            merged.rope_types = tuple(t.value for t in spec.rope.supported)
        if spec.description:
            merged.description = spec.description
    for key, (wrapped, origin) in list(merged.hf_optional.items()):
        merged.hf_optional[key] = (wrapped[1], origin)
    return merged, errors


# ---------------------------------------------------------------- resolution (per concrete spec)


# A runtime module a spec may select: its class, and where generated code imports it from ("":
# the bridges folder's own runtime_modules).
ModuleSources = Mapping[str, tuple[type[ModuleParameters], str]]
BUILTIN_MODULE_SOURCES: ModuleSources = {module.name: (module, module.__module__) for module in BUILTIN_MODULES}


def _module_binding_errors(merged: _Merged, modules: ModuleSources) -> list[SpecError]:
    """Each runtime module is one the spec can see, binds exactly the parameters it declares,
    and a field set by a literal megatron_defaults entry holds a value of the parameter's type."""
    errors: list[SpecError] = []
    for module_name, (bindings, origin) in sorted(merged.runtime_modules.items()):
        if module_name not in modules:
            known = ", ".join(sorted(modules))
            errors.append(
                origin.error(
                    f"unknown runtime module {module_name!r} (known: {known}; a specs folder declares "
                    f"its own in runtime_modules.py){_suggest(module_name, modules)}"
                )
            )
            continue
        module = modules[module_name][0]
        declared = parameter_names(module)
        for parameter in sorted(set(bindings) - declared):
            known = ", ".join(sorted(declared)) or "none"
            errors.append(
                origin.error(
                    f"runtime module {module_name!r} has no parameter {parameter!r} (it declares: {known})",
                    (parameter,),
                )
            )
        for parameter in sorted(declared - set(bindings)):
            errors.append(
                origin.error(
                    f"runtime module {module_name!r} needs its parameter {parameter!r} bound to a Megatron field"
                )
            )
        for parameter, field_name in sorted(bindings.items()):
            if parameter not in declared or field_name not in merged.megatron_defaults:
                continue
            value, default_origin = merged.megatron_defaults[field_name]
            reason = None if value is None else parameter_type_error(module, parameter, value)
            if reason is not None:
                errors.append(
                    default_origin.error(
                        f"Megatron field {field_name!r} feeds parameter {parameter!r} of runtime module "
                        f"{module_name!r}: {reason}"
                    )
                )
    return errors


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _line_of(loaded: LoadedSpec, path: FieldPath) -> str:
    location = loaded.location_of(path)
    return f"{location.path}:{location.line}"


def _unread_fields(
    merged: _Merged, loaded: LoadedSpec, read: frozenset[str]
) -> tuple[tuple[tuple[str, tuple[Any, ...], str], ...], tuple[str, ...], list[SpecError]]:
    """The HF fields accounted for without being read: (hf_neutral entries, hf_behaviour_free
    names, errors). A field the bridge reads needs neither; an inherited entry for it goes (the
    family maps what its base refused or ignored), one in the spec itself is an error."""
    errors: list[SpecError] = []
    neutral: list[tuple[str, tuple[Any, ...], str]] = []
    for name, (entry, origin) in sorted(merged.hf_neutral.items()):
        if name in read:
            if origin.loaded is loaded:
                errors.append(
                    origin.error(f"HF field {name!r} is read by this bridge; it cannot be neutral too")
                )
        elif name in merged.hf_behaviour_free:
            errors.append(origin.error(f"HF field {name!r} is also declared behaviour-free"))
        else:
            neutral.append((name, (entry.value, *entry.also), entry.why))
    behaviour_free: list[str] = []
    for name, origin in sorted(merged.hf_behaviour_free.items()):
        if name in read:
            if origin.loaded is loaded:
                errors.append(
                    origin.error(f"HF field {name!r} is read by this bridge; it cannot be behaviour-free too")
                )
        else:
            behaviour_free.append(name)
    return tuple(neutral), tuple(behaviour_free), errors


def _resolve_one(
    loaded: LoadedSpec, spec: SpecFile, merged: _Merged, modules: ModuleSources
) -> tuple[ResolvedSpec | None, list[SpecError]]:
    errors: list[SpecError] = []
    for architecture in spec.wrappers:
        if architecture not in spec.architectures:
            errors.append(
                loaded.error(("wrappers", architecture), f"{architecture!r} is not in architectures")
            )
    for required_key in ("architectures", "model_types"):
        if not getattr(spec, required_key):
            errors.append(loaded.error((), f"a concrete spec needs {required_key!r}"))
    if merged.megatron_model is None:
        errors.append(loaded.error((), "no 'megatron_model' given here or in any spec it extends"))
    if merged.activation_field is None:
        errors.append(loaded.error((), "no 'activation_field' given here or in any spec it extends"))
    if merged.rope_types is None:
        errors.append(loaded.error((), "no 'rope' section given here or in any spec it extends"))
    if not merged.activations:
        errors.append(loaded.error((), "no 'activations' given here or in any spec it extends"))
    model = merged.megatron_model or "gpt"
    errors += _module_binding_errors(merged, modules)
    module_fields = {
        field_name: module
        for module, (bindings, _) in sorted(merged.runtime_modules.items())
        if module in modules
        for field_name in sorted(bindings.values())
    }
    megatron_known = (
        config_fields()[model] | MODEL_FIELDS | frozenset(merged.extra_fields) | frozenset(module_fields)
    )
    for name, origin in sorted(merged.extra_fields.items()):
        if name in config_fields()[model] | MODEL_FIELDS:
            errors.append(origin.error(f"{name!r} is a megatron-core field; it needs no extra_fields entry"))
        elif name in module_fields:
            errors.append(
                origin.error(
                    f"{name!r} is read by runtime module {module_fields[name]!r}; it needs no extra_fields entry"
                )
            )
    by_megatron: dict[str, str] = {}
    activations = {hf: megatron for hf, (megatron, _) in merged.activations.items()}
    for hf_act, origin in merged.in_chain_order((k, o) for k, (_, o) in sorted(merged.activations.items())):
        megatron_act = activations[hf_act]
        if megatron_act in by_megatron:
            errors.append(
                origin.error(
                    f"activations {by_megatron[megatron_act]!r} and {hf_act!r} both map to {megatron_act!r}; "
                    "export could not tell which HF name to write"
                )
            )
        by_megatron.setdefault(megatron_act, hf_act)
    if merged.activation_default is not None and merged.activation_default not in merged.activations:
        errors.append(
            loaded.error(
                ("activation_default",),
                f"activation_default {merged.activation_default!r} is not in activations",
            )
        )

    # Megatron side: where each field is set. Entries of one spec setting the same field were
    # reported on merging; an inherited entry for a field set again is gone by now.
    megatron_source: dict[str, _Origin] = {}
    unknown_megatron: set[str] = set()
    megatron_claims = [
        (megatron_name, origin) for _, (megatron_name, origin) in sorted(merged.renames.items())
    ]
    megatron_claims += [(name, origin) for name, (_, origin) in sorted(merged.to_megatron.items())]
    megatron_claims += [(name, origin) for name, (_, origin) in sorted(merged.megatron_defaults.items())]
    for name, origin in merged.in_chain_order(megatron_claims):
        if name not in megatron_known:
            unknown_megatron.add(name)
            # difflib takes about a millisecond per name: a spec naming thousands of unknown
            # fields gets suggestions for the first few only.
            hint = _suggest(name, megatron_known) if len(unknown_megatron) <= MAX_SUGGESTIONS else ""
            errors.append(
                origin.error(
                    f"unknown Megatron field {name!r} (not a {'MLA' if model == 'mla' else ''}TransformerConfig field "
                    f"nor a model setting){hint}"
                )
            )
        megatron_source.setdefault(name, origin)
    for field_name, module in sorted(module_fields.items()):
        if field_name not in megatron_source:
            errors.append(
                merged.runtime_modules[module][1].error(
                    f"runtime module {module!r} reads Megatron field {field_name!r}, which no rename, "
                    "to_megatron or megatron_defaults entry sets"
                )
            )

    # HF side: export writes the activation field from the activation, so no entry may.
    activation_entries = [
        section[merged.activation_field][1]
        for section in (merged.renames, merged.to_hf, merged.hf_defaults)
        if merged.activation_field is not None and merged.activation_field in section
    ]
    if activation_entries:
        errors.append(
            activation_entries[0].error(
                f"HF field {merged.activation_field!r} is the activation field; it cannot be mapped too"
            )
        )

    for name, (_, origin) in sorted(merged.hf_aliases.items()):
        if name not in merged.renames and name not in merged.hf_optional and name not in merged.hf_required:
            errors.append(origin.error(f"alias target {name!r} is not an HF field this spec reads"))
    # Import side inputs.
    hf_known = frozenset(merged.renames) | frozenset(merged.hf_optional) | frozenset(merged.hf_required)
    for name, (_, origin) in merged.hf_optional.items():
        if name in merged.hf_required:
            errors.append(origin.error(f"HF field {name!r} is both optional and required"))

    megatron_values: list[Assignment] = []
    for hf_name, (megatron_name, _) in sorted(merged.renames.items(), key=lambda kv: kv[1][0]):
        megatron_values.append(Assignment(megatron_name, variable_name("hf", hf_name)))
    for megatron_name, (source, origin) in sorted(merged.to_megatron.items()):
        try:
            checked = parse_expression(source)
            check_names(checked, hf_known, "HF")
            megatron_values.append(
                Assignment(megatron_name, emit_python(checked, lambda n: variable_name("hf", n)))
            )
        except ExpressionError as exc:
            errors.append(origin.error(str(exc)))
    for megatron_name, (value, _) in sorted(merged.megatron_defaults.items()):
        megatron_values.append(Assignment(megatron_name, repr(value)))
    megatron_values.sort(key=lambda a: a.target)
    hf_checks: list[tuple[str, str]] = []
    for source, message, origin in merged.hf_checks:
        try:
            checked = parse_expression(source)
            check_names(checked, hf_known, "HF")
            hf_checks.append((emit_python(checked, lambda n: variable_name("hf", n)), message))
        except ExpressionError as exc:
            errors.append(origin.error(str(exc)))

    used_hf: set[str] = set(merged.renames)
    for source in [s for s, _ in merged.to_megatron.values()] + [c[0] for c in merged.hf_checks]:
        try:
            used_hf |= parse_expression(source).names
        except ExpressionError:
            pass
    hf_inputs = []
    for name in sorted(used_hf | set(merged.hf_required)):
        if name in merged.hf_optional:
            hf_inputs.append(HFInput(name, variable_name("hf", name), False, merged.hf_optional[name][0]))
        else:
            hf_inputs.append(HFInput(name, variable_name("hf", name), True, None))
    for name, (_, origin) in sorted(merged.hf_optional.items()):
        if name not in used_hf and origin.loaded is loaded:
            errors.append(
                origin.error(f"optional HF field {name!r} is declared but no rename or expression reads it")
            )

    # Export side.
    megatron_fields_set = frozenset(megatron_source)
    used_megatron: set[str] = set(merged.renames[k][0] for k in merged.renames)
    hf_values: list[Assignment] = []
    for hf_name, (megatron_name, _) in sorted(merged.renames.items()):
        hf_values.append(Assignment(hf_name, variable_name("m", megatron_name)))
    for hf_name, (source, origin) in sorted(merged.to_hf.items()):
        try:
            checked = parse_expression(source)
            check_names(checked, megatron_fields_set, "Megatron")
            used_megatron |= checked.names
            hf_values.append(Assignment(hf_name, emit_python(checked, lambda n: variable_name("m", n))))
        except ExpressionError as exc:
            errors.append(origin.error(str(exc)))
    for hf_name, (value, _) in sorted(merged.hf_defaults.items()):
        hf_values.append(Assignment(hf_name, repr(value)))
    hf_values.sort(key=lambda a: a.target)

    aliases = [(name, names) for name, (names, _) in merged.hf_aliases.items()]
    hf_neutral, hf_behaviour_free, unread_errors = _unread_fields(
        merged, loaded, mapped_hf_fields(hf_inputs, hf_values, merged.activation_field or "", aliases)
    )
    errors += unread_errors

    # Weights.
    weights: list[ResolvedWeight] = []
    for megatron_name, (weight, origin) in sorted(merged.weights.items()):
        hf_names = (weight.hf,) if isinstance(weight.hf, str) else tuple(weight.hf)
        if weight.shares_hf_with is not None:
            shared = merged.weights.get(weight.shares_hf_with)
            problem = _sharing_problem(megatron_name, weight, shared[0] if shared else None)
            if problem is not None:
                errors.append(origin.error(problem, ("shares_hf_with",)))
                continue
            assert shared is not None
            hf_names = (shared[0].hf,) if isinstance(shared[0].hf, str) else tuple(shared[0].hf)
        if weight.value is not None and weight.kind is not WeightKind.constant:
            errors.append(origin.error(f"value applies to kind 'constant' only, not {weight.kind.value!r}", ("value",)))
        expected = HF_ARITY.get(weight.kind, 1)
        if len(hf_names) != expected:
            errors.append(
                origin.error(
                    f"kind {weight.kind.value!r} takes {expected} HF tensor(s), got {len(hf_names)}", ("hf",)
                )
            )
        placeholders = placeholders_of(megatron_name)
        templates = [(name, "hf") for name in hf_names]
        if weight.te_megatron:
            templates.append((weight.te_megatron, "te_megatron"))
        problems: list[tuple[str, FieldPath]] = [
            (problem, ()) for problem in placeholder_problems(megatron_name, KNOWN_PLACEHOLDERS)
        ]
        problems += [
            (problem, (key,))
            for template, key in templates
            for problem in placeholder_problems(template, KNOWN_PLACEHOLDERS, placeholders)
        ]
        problems += [
            (problem, ("hf_copies", index))
            for index, copy in enumerate(weight.hf_copies)
            for problem in placeholder_problems(copy, COPY_PLACEHOLDERS, placeholders)
        ]
        errors += [origin.error(problem, suffix) for problem, suffix in problems]
        if weight.gate_up is not GateUp.stacked and weight.kind is not WeightKind.fused_gate_up:
            errors.append(
                origin.error(
                    f"gate_up applies to kind 'fused_gate_up' only, not {weight.kind.value!r}", ("gate_up",)
                )
            )
        if weight.hf_layout is not HFLayout.same and weight.kind is WeightKind.constant:
            errors.append(origin.error("a constant tensor has no HF tensor to lay out", ("hf_layout",)))
        if weight.hf_layout is HFLayout.transposed and weight.kind not in TRANSPOSABLE_KINDS:
            errors.append(
                origin.error(
                    f"hf_layout transposed is not supported for kind {weight.kind.value!r} "
                    f"(only {', '.join(kind.value for kind in TRANSPOSABLE_KINDS)})",
                    ("hf_layout",),
                )
            )
        if weight.hf_stacked_experts and "expert" not in placeholders:
            errors.append(
                origin.error(
                    f"hf_stacked_experts needs {{expert}} in {megatron_name!r}", ("hf_stacked_experts",)
                )
            )
        # Comparing placeholder sets only means something once every template's are well formed.
        for template, key in templates if not problems else []:
            wanted = placeholders - {"expert"} if weight.hf_stacked_experts and key == "hf" else placeholders
            if placeholders_of(template) != wanted:
                errors.append(
                    origin.error(f"{template!r} must use the same placeholders as {megatron_name!r}", (key,))
                )
        for index, copy in enumerate(weight.hf_copies):
            if len(hf_names) != 1 or weight.hf_stacked_experts:
                errors.append(
                    origin.error(
                        "hf_copies repeat one HF tensor: not for fused kinds or stacked experts",
                        ("hf_copies", index),
                    )
                )
            elif not problems and placeholders_of(copy) - {"mtp_layer"} != placeholders:
                errors.append(
                    origin.error(
                        f"{copy!r} must use the placeholders of {megatron_name!r}, and may add {{mtp_layer}}",
                        ("hf_copies", index),
                    )
                )
        when_python = None
        if weight.when is not None:
            try:
                checked = parse_expression(weight.when)
                check_names(checked, megatron_fields_set, "Megatron")
                # The condition reads the config itself, in its own function: its names are
                # no inputs of hf_values, where a variable read only here would be unused.
                when_python = emit_python(checked, lambda n: f"config.value({n!r})")
            except ExpressionError as exc:
                errors.append(origin.error(str(exc), ("when",)))
        weights.append(
            ResolvedWeight(
                megatron_name,
                weight.te_megatron,
                hf_names,
                weight.kind,
                when_python,
                weight.norm_offset,
                weight.hf_stacked_experts,
                tuple(weight.hf_copies),
                location=origin.loaded.location_of(origin.path),
                hf_layout=weight.hf_layout,
                gate_up=weight.gate_up,
                value=float(weight.value or 0.0),
                shares_hf_with=weight.shares_hf_with,
            )
        )
    for weight, hf_name, other, same_condition in _double_mappings(weights):
        _, origin = merged.weights[weight.megatron_name]
        errors.append(
            origin.error(
                f"HF tensor {hf_name!r} is also mapped by {other!r}"
                + (", under the same condition" if same_condition else ""),
                ("hf",),
            )
        )
    for name, origin in sorted(merged.hf_ignore.items()):
        errors += [origin.error(problem) for problem in placeholder_problems(name, KNOWN_PLACEHOLDERS)]
    sorted_hf = sorted({hf_name for weight in weights for hf_name in (*weight.hf_names, *weight.hf_copies)})
    for architecture, wrapper in spec.wrappers.items():
        for index, carried in enumerate(wrapper.carried_weights):
            clash = _first_carried_clash(carried, wrapper.weight_prefix, sorted_hf)
            if clash is not None:
                errors.append(
                    loaded.error(
                        ("wrappers", architecture, "carried_weights", index),
                        f"{carried!r} would carry language-model tensor {wrapper.weight_prefix + clash!r} "
                        "past the conversion",
                    )
                )

    if errors:
        return None, errors
    return (
        ResolvedSpec(
            family=loaded.name,
            source=loaded.path,
            class_name=class_name_for(loaded.name),
            description=merged.description,
            architectures=tuple(spec.architectures),
            model_types=tuple(spec.model_types),
            wrappers=tuple(
                ResolvedWrapper(arch, w.config, w.weight_prefix, tuple(w.carried_weights))
                for arch, w in sorted(spec.wrappers.items())
            ),
            megatron_model=model,
            activation_field=merged.activation_field or "",
            activation_default=merged.activation_default,
            hf_checks=tuple(hf_checks),
            activations=tuple(sorted((k, v) for k, (v, _) in merged.activations.items())),
            rope_types=merged.rope_types or (),
            hf_inputs=tuple(hf_inputs),
            megatron_values=tuple(megatron_values),
            megatron_inputs=tuple(sorted((variable_name("m", n), n) for n in used_megatron)),
            hf_values=tuple(hf_values),
            weights=tuple(weights),
            hf_ignore=tuple(sorted(merged.hf_ignore)),
            extra_fields=tuple(
                sorted(
                    set(merged.extra_fields) | (set(module_fields) - config_fields()[model] - MODEL_FIELDS)
                )
            ),
            runtime_modules=tuple(
                (module, tuple(sorted(bindings.items())))
                for module, (bindings, _) in sorted(merged.runtime_modules.items())
            ),
            runtime_module_classes=tuple(
                sorted(
                    (modules[module][1], modules[module][0].__name__)
                    for module in merged.runtime_modules
                    if module in modules
                )
            ),
            hf_aliases=tuple(sorted((k, tuple(v)) for k, (v, _) in merged.hf_aliases.items())),
            example_config=tuple(spec.example_config.items()),
            hf_neutral=hf_neutral,
            hf_behaviour_free=hf_behaviour_free,
            model_type_lines=tuple(
                (model_type, _line_of(loaded, ("model_types", index)))
                for index, model_type in enumerate(spec.model_types)
            ),
            example_config_location=loaded.location_of(("example_config",)),
        ),
        [],
    )


# ---------------------------------------------------------------- the whole run


def resolve_all(
    loaded_specs: list[LoadedSpec],
    known_names: frozenset[str] = frozenset(),
    spec_listing: str = "",
    modules: ModuleSources = BUILTIN_MODULE_SOURCES,
) -> list[ResolvedSpec]:
    """Validate, cross-check and resolve every spec; raise SpecErrors with all problems found.

    ``spec_listing`` ends the message of an ``extends`` naming no spec (the specs there are).
    Claims on one architecture are reported at the spec given later in ``loaded_specs``."""
    errors: list[SpecError] = []
    valid: dict[str, tuple[LoadedSpec, SpecFile]] = {}
    for loaded in loaded_specs:
        spec, file_errors = validate_file(loaded)
        errors.extend(file_errors)
        if spec is not None:
            valid[loaded.name] = (loaded, spec)

    # Cross-spec checks: unknown extends, cycles, claims on the same architecture / model type.
    # Specs that failed to load still exist: extending them is not an "unknown spec" error.
    all_names = {loaded.name for loaded in loaded_specs} | set(known_names)
    chains: dict[str, list[tuple[LoadedSpec, SpecFile]]] = {}
    for name, (loaded, spec) in sorted(valid.items()):
        chain = [(loaded, spec)]
        seen = [name]
        ok = True
        current = spec
        while current.extends is not None:
            parent = current.extends
            if parent in seen:
                if name == parent or seen[0] == name:
                    cycle = " -> ".join([*seen, parent])
                    errors.append(loaded.error(("extends",), f"inheritance cycle: {cycle}"))
                ok = False
                break
            if parent not in valid:
                if parent not in all_names:
                    origin_loaded = chain[-1][0]
                    if origin_loaded is loaded:
                        errors.append(
                            loaded.error(
                                ("extends",),
                                f"extends unknown spec {parent!r}{_suggest(parent, all_names)}{spec_listing}",
                            )
                        )
                ok = False
                break
            seen.append(parent)
            chain.append(valid[parent])
            current = valid[parent][1]
        if ok:
            chains[name] = list(reversed(chain))

    claimed: dict[tuple[str, str], LoadedSpec] = {}
    for loaded, spec in valid.values():
        if spec.abstract:
            continue
        for key in ("architectures", "model_types"):
            for index, value in enumerate(getattr(spec, key)):
                other = claimed.get((key, value))
                if other is not None:
                    errors.append(loaded.error((key, index), f"{value!r} is already claimed by {other.path}"))
                else:
                    claimed[(key, value)] = loaded

    resolved: list[ResolvedSpec] = []
    for name, chain in sorted(chains.items()):
        loaded, spec = valid[name]
        if spec.abstract:
            continue
        merged, merge_errors = _merge_chain(chain)
        result, spec_errors = _resolve_one(loaded, spec, merged, modules)
        errors += merge_errors + spec_errors
        if result is not None:
            resolved.append(result)
    if errors:
        raise SpecErrors(errors)
    return resolved
