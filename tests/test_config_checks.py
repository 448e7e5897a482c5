"""transformers' check of a config, run beside the conversion (``config_checks_alongside``).

The check imports transformers' config classes (1-2 s with a cold page cache); in a one-process
CLI import or export it is held back until the conversion has done its own imports
(``start_config_checks``), then overlaps the reading and writing. What must not change: a wrong
config is still refused, nothing is published while its check runs or after it failed, and the
error said is the config's, not whatever the wrong value broke further on.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bridgegen.bridge.config_checks import (
    check_with_transformers,
    config_checks_alongside,
    raise_if_a_config_check_failed,
    start_config_checks,
    wait_for_config_checks,
)
from bridgegen.bridge.errors import ConfigError, WeightError
from bridgegen.formats.folders import publish_folder

WRONG = {"model_type": "llama", "rms_norm_eps": "1e-6"}  # a str where LlamaConfig wants a float
RIGHT = {"model_type": "llama", "rms_norm_eps": 1e-6}
REFUSED = r"config\.json: Field 'rms_norm_eps' expected float, got str .*LlamaConfig"


def test_outside_the_block_the_check_runs_in_line() -> None:
    with pytest.raises(ConfigError, match=REFUSED):
        check_with_transformers(WRONG, "config.json")
    check_with_transformers(RIGHT, "config.json")


@pytest.mark.parametrize("started", [False, True], ids=["held", "started"])
def test_a_wrong_config_is_refused_when_the_block_ends(started: bool) -> None:
    reached_the_end = False
    with pytest.raises(ConfigError, match=REFUSED), config_checks_alongside():
        check_with_transformers(WRONG, "config.json")  # returns: the check is held back
        if started:
            start_config_checks()  # runs in a thread now
        reached_the_end = True
    assert reached_the_end


def test_a_held_check_runs_in_a_thread_once_started(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import bridgegen.bridge.config_checks as config

    ran_in: list[str] = []
    monkeypatch.setattr(config, "_check_with_transformers", lambda *_: ran_in.append(threading.current_thread().name))
    with config_checks_alongside():
        check_with_transformers(RIGHT, "config.json")
        assert ran_in == []  # held back while the conversion imports what it needs
        start_config_checks()
        wait_for_config_checks()
        assert ran_in == ["bridgegen-config-check"]


def test_nothing_is_published_while_the_config_is_wrong(tmp_path: Path) -> None:
    tmp, target = tmp_path / ".out.tmp", tmp_path / "out"
    tmp.mkdir()
    (tmp / "file").write_text("data")
    with pytest.raises(ConfigError, match=REFUSED), config_checks_alongside():
        check_with_transformers(WRONG, "config.json")
        start_config_checks()
        publish_folder(tmp, target)
    assert not target.exists()
    assert (tmp / "file").exists()  # left for the caller's clean-up, as on any failure


def test_a_folder_is_published_once_the_check_passed(tmp_path: Path) -> None:
    tmp, target = tmp_path / ".out.tmp", tmp_path / "out"
    tmp.mkdir()
    with config_checks_alongside():
        check_with_transformers(RIGHT, "config.json")
        publish_folder(tmp, target)
    assert target.is_dir()


def test_the_config_error_replaces_what_the_wrong_value_broke() -> None:
    with pytest.raises(ConfigError, match=REFUSED) as caught, config_checks_alongside():
        check_with_transformers(WRONG, "config.json")
        start_config_checks()
        raise WeightError("a later step that the wrong value broke")
    assert caught.value.__suppress_context__


def test_an_error_of_a_right_config_run_stays_its_own() -> None:
    with pytest.raises(WeightError, match="its own"), config_checks_alongside():
        check_with_transformers(RIGHT, "config.json")
        raise WeightError("its own")


def test_a_long_conversion_stops_at_the_next_tensor_once_the_check_failed() -> None:
    with pytest.raises(ConfigError, match=REFUSED), config_checks_alongside():
        check_with_transformers(WRONG, "config.json")
        start_config_checks()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # what the per-tensor loops call
            raise_if_a_config_check_failed()
            time.sleep(0.01)
        pytest.fail("the failed check was never seen")


def test_the_thread_checks_the_config_as_it_was_given() -> None:
    config = dict(WRONG)
    with pytest.raises(ConfigError, match=REFUSED), config_checks_alongside():
        check_with_transformers(config, "config.json")
        config["rms_norm_eps"] = 1e-6  # the caller goes on to change its dict
        start_config_checks()
    wait_for_config_checks()  # outside any block: nothing to wait for
