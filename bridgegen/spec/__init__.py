"""The spec compiler: YAML specs -> validated models (pydantic) -> resolved specs -> rendered,
formatted bridge modules (jinja2, ruff), written or checked against ``generated/``.

May import: ``bridgegen.bridge`` (the vocabulary it validates against); never torch,
megatron-core, or the folders above it (the example-model check lives in ``megatron``).
"""
