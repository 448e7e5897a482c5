"""megatron-core models: configs, building a GPTModel for a conversion, the runtime modules
a spec selects, CPU support, and the example-model check of ``bridgegen check``.

May import: ``bridgegen.bridge``, ``bridgegen.plan``, ``bridgegen.formats``, ``bridgegen.spec``
and megatron-core; never engines or cli.
"""
