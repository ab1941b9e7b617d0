"""The command line's shape: its subcommands and the installed entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from energy_callbacks.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_is_the_cli_main():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]
    assert 'energy-callbacks = "energy_callbacks.cli:main"' in scripts.splitlines()[1]


def test_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "plot", "reproduce"):
        assert command in out


def test_demo_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["demo"])
    assert args.rules == "backprop,combined,lazy" and args.frameworks is None
    assert (args.hidden, args.epochs, args.batch_size, args.lr) == (256, 15, 32, 0.2)
    assert args.dataset == "digits" and args.out == "demo-results"


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
