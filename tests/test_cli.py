"""The command line: the demo does real work on the bundled digits set."""

from __future__ import annotations

import pytest

from energy_callbacks.cli import main


def test_demo_prints_energy_table(capsys):
    assert main(["demo", "--hidden", "40", "--epochs", "1", "--target", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out
    for rule in ("backprop", "top 10% units, path", "memorized mistakes"):
        assert rule in out
    assert "inefficiency" in out


@pytest.mark.parametrize(
    "argv", [["demo", "--target", "1.5"], ["demo", "--hidden", "0"], ["demo", "--epochs", "0"]]
)
def test_demo_rejects_bad_arguments(argv, capsys):
    assert main(argv) == 2
    assert "must be" in capsys.readouterr().err
