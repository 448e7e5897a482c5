"""The ``bridgegen`` command: ``main`` (generate, check, list, schema), ``convert`` (import,
export, verify: arguments, the checks before any work with ``early_checks`` and Hub ids with
``hub``, local ranks), ``ranks`` (what one rank does) and ``demo``.

May import: anything in bridgegen.
"""
