"""Engines carry a plan out: file -> file streaming (``stream_import``, ``stream_export``),
the model-holding API (``model.ModelBridge``), distributed layouts (``distributed``), logits
parity (``verify``), and the processes they run on (``launch``, ``supervise``).

May import: every folder below it (bridge, plan, formats, megatron); never cli.
"""
