"""bridgegen: Hugging Face <-> Megatron-Core conversion, one YAML spec per architecture family."""

__version__ = "0.1.0"
