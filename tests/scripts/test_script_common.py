"""scripts/common.py: which errors become one line and which keep their traceback; config diffs."""

from __future__ import annotations

import pytest
from common import config_diff, config_errors  # scripts/ is on sys.path (tests/conftest.py)
from hydra.utils import instantiate


def broken_target(x: int) -> int:
    return x // 0  # a bug, not the user's input


def test_a_bug_inside_a_hydra_target_keeps_its_own_exception_and_traceback():
    with pytest.raises(ZeroDivisionError) as err, config_errors():
        instantiate({"_target_": f"{__name__}.broken_target", "x": 1})
    assert any(frame.name == "broken_target" for frame in err.traceback)


def test_a_config_error_inside_a_target_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as err, config_errors():
        instantiate({"_target_": "metaloss.meta.Proximal", "strength": -1.0})
    assert err.value.code == 2
    assert capsys.readouterr().err == "error: proximal strength must be > 0, got -1.0\n"


def test_config_diff_names_the_keys_that_change_a_result_only():
    saved = {"seed": 0, "train": {"meta_steps": 10, "checkpoint_every": 5}, "progress": True,
             "logger": {"log_dir": "a"}}  # fmt: skip
    current = {"seed": 1, "train": {"meta_steps": 10, "checkpoint_every": 50}, "progress": False,
               "logger": {"log_dir": "b"}, "task": {"n_way": 5}}  # fmt: skip
    assert config_diff(saved, current) == ["seed", "task.n_way"]
