"""transformers' own check of an HF config, run in line or held back to run beside a conversion.

transformers is imported only when a check runs.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from bridgegen.bridge.errors import ConfigError


class _ChecksAlongside:
    """Config checks held back, then run in a thread beside the work that follows them (see
    ``config_checks_alongside``)."""

    def __init__(self) -> None:
        self.held: list[tuple[dict[str, Any], str]] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def hold(self, data: Mapping[str, Any], source: str) -> None:
        self.held.append((copy.deepcopy(dict(data)), source))  # the caller may go on to change its dict

    def start(self) -> None:
        held, self.held = self.held, []
        for data, source in held:

            def run(data: dict[str, Any] = data, source: str = source) -> None:
                try:
                    _check_with_transformers(data, source)
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                    self.errors.append(exc)

            thread = threading.Thread(target=run, name="bridgegen-config-check", daemon=True)
            thread.start()
            self.threads.append(thread)

    def raise_if_failed(self) -> None:
        if self.errors:
            raise self.errors[0]

    def wait(self) -> None:
        held, self.held = self.held, []
        for data, source in held:  # never started: checked here
            _check_with_transformers(data, source)
        for thread in self.threads:
            thread.join()
        self.raise_if_failed()


_alongside: _ChecksAlongside | None = None


@contextmanager
def config_checks_alongside() -> Iterator[None]:
    """Within the block, ``check_with_transformers`` holds its check back; ``start_config_checks``
    runs the held checks in a thread beside the conversion: with a cold page cache, importing
    transformers' config classes takes 1-2 s, which then overlaps the conversion's reading and
    writing. ``publish_folder`` waits for every check (running one not started) before anything
    appears (``wait_for_config_checks``), the conversion stops at the next tensor once one has
    failed (``raise_if_a_config_check_failed``), and an error raised in the block while a config
    was wrong is replaced by the config's error, the cause. One process only: ranks check in
    line."""
    global _alongside
    outer, _alongside = _alongside, _ChecksAlongside()
    checks = _alongside
    try:
        yield
        checks.wait()
    except Exception:
        try:
            checks.wait()
        except ConfigError as problem:
            raise problem from None  # the config's error is the cause
        raise
    finally:
        _alongside = outer


def start_config_checks() -> None:
    """Start the checks held back so far, in a thread. Called once every import the work needs
    is done: two threads importing at once can meet in Python's import locks (a circular import
    between them is a deadlock error), and the check imports transformers."""
    if _alongside is not None and _alongside.held:
        _alongside.start()


def wait_for_config_checks() -> None:
    """Run the checks held back, wait for those running; raise the first failure. Nothing is
    published before."""
    if _alongside is not None:
        _alongside.wait()


def raise_if_a_config_check_failed() -> None:
    """Raise the error of a config check running alongside that has already failed: cheap,
    called once per tensor so a wrong config stops a long conversion early."""
    if _alongside is not None:
        _alongside.raise_if_failed()


def check_with_transformers(data: Mapping[str, Any], source: str) -> None:
    """Refuse a config whose values transformers' own config class for its ``model_type``
    refuses (see ``_check_with_transformers``); within ``config_checks_alongside`` the check
    is held back, to run beside what follows (``start_config_checks``)."""
    if _alongside is not None:
        _alongside.hold(data, source)
    else:
        _check_with_transformers(data, source)


def _check_with_transformers(data: Mapping[str, Any], source: str) -> None:
    """Refuse a config whose values transformers' own config class for its ``model_type``
    refuses: a field of the wrong type (``tie_word_embeddings: "false"``, ``rms_norm_eps:
    "1e-6"``, ``hidden_size: 64.0``), a value out of its range, an incomplete RoPE block.
    transformers 5 config classes check every declared field's type (strict dataclasses); with
    a transformers that does not, or that does not know the model type, only our own checks run.
    """
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        return
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    if model_type not in CONFIG_MAPPING:
        return  # a model type this transformers does not know
    config_class = CONFIG_MAPPING[model_type]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # its notices about legacy values are not errors
    try:
        # A copy: the config class completes nested dicts (rope_scaling) in place.
        config_class(**{key: copy.deepcopy(value) for key, value in data.items() if key != "model_type"})
    except StrictDataclassFieldValidationError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise ConfigError(f"{source}: {cause} (refused by transformers' {config_class.__name__})") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{source}: {exc} (refused by transformers' {config_class.__name__})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
