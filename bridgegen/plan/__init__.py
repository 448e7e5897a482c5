"""The conversion plan, pure: bridge + config + layout -> for each Megatron tensor its HF
sources, transform, shape and shard. Also which bridge serves a config (``bridges``).

May import: ``bridgegen.bridge``, ``bridgegen.generated`` and torch tensors; no file I/O,
no torch.distributed, nothing from formats, megatron, engines or cli.
"""
