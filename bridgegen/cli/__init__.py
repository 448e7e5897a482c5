"""The ``bridgegen`` command: ``main`` (generate, check, list, schema), ``convert`` (import,
export, verify) and ``demo``.

May import: anything in bridgegen.
"""
