"""What generated bridge modules are written against: the ``Bridge`` base class, the config
objects, the weight-rule vocabulary, the expression helpers, the runtime-module parameter
classes, RoPE settings and the errors everything raises.

May import: the standard library and pydantic-free plain Python only; never torch,
megatron-core, transformers or safetensors at module level (``make generate`` / ``check`` and
config conversion load it without them). Nothing else of bridgegen.
"""
