"""The one-line error rule shared by every CLI (scgcm.errors.run_cli)."""

import pytest

from scgcm.data.sources import DataError
from scgcm.errors import UserError, debug_requested, run_cli


def failing(argv):
    raise DataError(f"--config.data.source {argv[0]}: no such file")


def test_user_error_is_one_line_and_exit_2(capsys):
    assert run_cli(failing, ["missing.npz"]) == 2
    assert capsys.readouterr().err == "error: --config.data.source missing.npz: no such file\n"


def test_debug_flag_shows_the_traceback_and_is_not_passed_on(monkeypatch):
    monkeypatch.delenv("SCGCM_DEBUG", raising=False)
    with pytest.raises(UserError):
        run_cli(failing, ["x", "--debug"])
    assert run_cli(lambda argv: len(argv), ["a", "--debug"]) == 1  # main sees argv without --debug


def test_debug_environment_variable():
    assert debug_requested([], {"SCGCM_DEBUG": "1"})
    assert not debug_requested([], {"SCGCM_DEBUG": "0"})
    assert not debug_requested(["--seed", "1"], {})


def test_other_exceptions_are_not_swallowed():
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda argv: 1 / 0, [])
