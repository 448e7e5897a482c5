"""One model's conversion, shared by every engine: its bridge, its Megatron config, where its
HF files are, and how its checkpoint keys are named; from these, its weight map."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from bridgegen.bridge.base import Bridge, Wrapper
from bridgegen.bridge.config import MODEL_FIELDS, MegatronConfig
from bridgegen.bridge.errors import ConfigError
from bridgegen.bridge.module_parameters import ModuleParameters, selected_modules
from bridgegen.plan.weight_map import WeightMap


class KeyNames(str, Enum):
    """How a checkpoint's norm weights are keyed (see ``formats.key_names``). ``te``: the
    Transformer Engine spec's names (what Megatron-LM and Megatron-Bridge train with by
    default); ``local``: the plain spec's (``--transformer-impl local``)."""

    te = "te"
    local = "local"


@dataclass
class Conversion:
    """An HF model's bridge and Megatron config, and the plan of its tensors."""

    bridge: type[Bridge]
    config: MegatronConfig
    hf_dir: Path | None = None
    drop_mtp: bool = False
    # How checkpoint keys are named (see formats/key_names.py) and whether every layer has keys
    # of its own (a checkpoint saved so) rather than stacked ones.
    key_names: KeyNames = KeyNames.te
    per_layer_keys: bool = False

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any], source: str = "config.json") -> Any:
        """The conversion of an HF config dict, by the bridge that claims it (built-in or from
        a ``BRIDGEGEN_BRIDGES`` folder). Returns an instance of ``cls``."""
        from bridgegen.plan.bridges import bridge_for_config

        bridge = bridge_for_config(hf_config)
        return cls(bridge, bridge.to_megatron_config(hf_config, source=source))

    def wrapper(self) -> Wrapper | None:
        """Where the language model sits when the HF architecture is a larger model."""
        return self.bridge.wrappers.get(self.config.hf_architecture or "")

    def weight_map(self) -> WeightMap:
        wrapper = self.wrapper()
        return WeightMap(
            self.bridge.weight_rules,
            self.config,
            self.bridge.hf_ignore,
            ignore_layers_from=int(self.config.value("num_layers")) if self.drop_mtp else None,
            hf_prefix=wrapper.weight_prefix if wrapper else "",
            carried=wrapper.carried_weights if wrapper else (),
        )

    def with_vocab_multiple(self, multiple: int) -> Any:
        """The same model with its embedding rows padded to a multiple of ``multiple``."""
        if multiple < 1:
            raise ConfigError(f"vocab multiple must be at least 1, got {multiple}")
        values = dict(self.config.values, make_vocab_size_divisible_by=multiple)
        values.pop("padded_vocab_size", None)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, values=values))

    def without_mtp(self) -> Any:
        """The same model without its multi-token prediction layers: they are not built, their
        HF tensors (layers numbered from num_layers on) are skipped on import, and an export
        says num_nextn_predict_layers 0, as it holds none."""
        values = dict(self.config.values)
        values["mtp_num_layers"] = None
        return dataclasses.replace(
            self, config=dataclasses.replace(self.config, values=values), drop_mtp=True
        )

    def runtime_modules(self) -> list[ModuleParameters]:
        """The spec's runtime modules that apply to this config (every field a module reads has
        a value), with their parameters, each checked against the type the module declares."""
        return selected_modules(
            self.bridge.runtime_modules, self.bridge.runtime_module_types, self.config.values, self.config.family
        )

    def refuse_unimplemented(self) -> None:
        """An extra Megatron field with a value that no runtime module reads is a quirk the
        model would silently lack: refuse to build it."""
        read = {field for bindings in self.bridge.runtime_modules.values() for field in bindings.values()}
        extra = frozenset(self.bridge.extra_fields) - MODEL_FIELDS
        pending = sorted(
            name
            for name, value in self.config.values.items()
            if name not in read and value is not None and name in extra
        )
        if pending:
            raise ConfigError(
                f"{self.config.family}: the runtime cannot build a model with {', '.join(pending)} yet "
                "(config conversion works; weights and forward need these quirks implemented)"
            )

    def hf_config(self) -> dict[str, Any]:
        return self.bridge.to_hf_config(self.config)

    def export_config(self, dtype: Any) -> dict[str, Any]:
        """The config.json of an export whose tensors are plain ``dtype`` (a torch dtype)."""
        hf_config = self.hf_config()
        hf_config.pop("quantization_config", None)  # exports write unquantized tensors
        # transformers >= 4.56 writes `dtype`, older versions `torch_dtype`; state the truth.
        for key in ("dtype", "torch_dtype"):
            if key in hf_config or key == "torch_dtype":
                hf_config[key] = str(dtype).removeprefix("torch.")
        return hf_config
