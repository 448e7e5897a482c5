"""The example-model check of `bridgegen check`: each spec's ``example_config`` is built as a
megatron-core model on the meta device (names and shapes, no storage) by the runtime's own build
path, and every parameter must have a weight rule and every rule that applies a parameter.

A spec whose rules miss a parameter (or name one that megatron-core does not build) fails here,
when the spec is written, instead of at its first weight import. torch and megatron-core are
imported only when this check runs.
"""

from __future__ import annotations

import hashlib
import posixpath
import sys
import types
from typing import TYPE_CHECKING

from bridgegen.bridge.base import Bridge
from bridgegen.spec.errors import Location, SpecError
from bridgegen.spec.folder_modules import MODULES_FILE
from bridgegen.spec.render import GENERATED_PACKAGE_DIR
from bridgegen.spec.resolve import ResolvedSpec

if TYPE_CHECKING:
    import torch

    from bridgegen.plan.conversion import Conversion
    from bridgegen.plan.weight_map import WeightMap


def rendered_bridge(
    spec: ResolvedSpec, files: dict[str, str], generated_dir: str = GENERATED_PACKAGE_DIR
) -> type[Bridge]:
    """The bridge class the spec renders to, from the rendered text (what `make generate`
    would write into ``generated_dir``), not from the folder on disk."""
    path = posixpath.normpath(f"{generated_dir}/{spec.family}.py")
    package = _rendered_package(files, generated_dir)
    module = types.ModuleType(f"{package}.{spec.family}")
    module.__package__ = package
    exec(compile(files[path], path, "exec"), module.__dict__)
    bridge: type[Bridge] = getattr(module, spec.class_name)
    return bridge


def _rendered_package(files: dict[str, str], generated_dir: str) -> str:
    """A package standing for the bridges folder being rendered, holding its rendered
    runtime_modules (what a bridge's ``from .runtime_modules import ...`` reads)."""
    modules_path = posixpath.normpath(f"{generated_dir}/{MODULES_FILE}")
    text = files.get(modules_path, "")
    name = "_bridgegen_rendered_" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = []
        sys.modules[name] = package
        if text:
            runtime = types.ModuleType(f"{name}.runtime_modules")
            runtime.__package__ = name
            sys.modules[runtime.__name__] = runtime
            exec(compile(text, modules_path, "exec"), runtime.__dict__)
    return name


def build_example_model(spec: ResolvedSpec, bridge: type[Bridge]) -> tuple[Conversion, torch.nn.Module]:
    """The megatron-core model of the spec's example config, on the meta device, through the
    runtime's build path."""
    import torch

    from bridgegen.megatron.build import build_model
    from bridgegen.plan.conversion import Conversion

    config = bridge.to_megatron_config(bridge.example_hf_config(), source=f"{spec.source} example_config")
    conversion = Conversion(bridge, config)
    with torch.device("meta"):
        return conversion, build_model(conversion, torch.float32)


def rules_of_parameters(weight_map: WeightMap, model: torch.nn.Module) -> dict[str, str | None]:
    """Each Megatron tensor a conversion fills: the Megatron name of its rule, None if none."""
    from bridgegen.bridge.errors import WeightError
    from bridgegen.plan.weight_map import model_tensors

    found: dict[str, str | None] = {}
    for name, _ in model_tensors(model):
        try:
            found[name] = weight_map.match(name).rule.megatron_name
        except WeightError:
            found[name] = None
    return found


def example_model_errors(spec: ResolvedSpec, bridge: type[Bridge]) -> list[SpecError]:
    """What is wrong between the spec's weight rules and the megatron-core model of its
    example config: parameters without a rule, and rules (whose ``when:`` holds) that match no
    parameter."""
    from bridgegen.bridge.errors import BridgeError

    where = spec.example_config_location or Location(spec.source, 1, 1)
    if not spec.example_config:
        return [
            SpecError(
                where,
                "example_config",
                "missing: the HF config of a tiny model of the family, which `bridgegen check` "
                "builds and the family tests run",
            )
        ]
    try:
        model_bridge, model = build_example_model(spec, bridge)
    except BridgeError as exc:
        return [SpecError(where, "example_config", f"the example model cannot be built: {exc}")]
    except Exception as exc:  # megatron-core refuses a config by any exception, assertions included
        message = f"megatron-core cannot build the example model: {type(exc).__name__}: {exc}"
        return [SpecError(where, "example_config", message)]
    weight_map = model_bridge.weight_map()
    rules = rules_of_parameters(weight_map, model)
    errors = norm_kind_errors(model, str(model_bridge.config.values.get("normalization") or "LayerNorm"), where)
    errors += [
        SpecError(
            where, "example_config", f"Megatron parameter {name!r} of the example model has no weight rule"
        )
        for name, rule in rules.items()
        if rule is None
    ]
    matched = set(rules.values())
    locations = {weight.megatron_name: weight.location for weight in spec.weights}
    errors += [
        SpecError(
            locations.get(rule.megatron_name) or Location(spec.source, 1, 1),
            f"weights[{rule.megatron_name}]",
            "matches no parameter of the example model (its when: holds for example_config)",
        )
        for rule in weight_map.rules
        if rule.megatron_name not in matched
    ]
    return errors


def norm_kind_errors(model: torch.nn.Module, normalization: str, where: Location) -> list[SpecError]:
    """Each norm the example model holds is of the kind the spec's ``normalization`` names: a
    LayerNorm built as an RMSNorm (or the other way) computes another model with the same weights."""
    from bridgegen.megatron.modules import built_normalization

    return [
        SpecError(
            where,
            "example_config",
            f"the example model's {name} is built as {built} ({type(module).__name__}), but the spec's "
            f"normalization is {normalization}",
        )
        for name, module in model.named_modules()
        if (built := built_normalization(module)) is not None and built != normalization
    ]


def example_models_errors(
    specs: list[ResolvedSpec], files: dict[str, str], generated_dir: str = GENERATED_PACKAGE_DIR
) -> list[SpecError]:
    """``example_model_errors`` of every spec, from the rendered ``files`` (bridges in
    ``generated_dir``; ``.`` for a folder of bridges of specs kept outside this project)."""
    return [
        error
        for spec in specs
        for error in example_model_errors(spec, rendered_bridge(spec, files, generated_dir))
    ]
