"""energy_callbacks.plot: CSVLogger files (Lightning and Keras layouts) to curves and a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from energy_callbacks.cli import main
from energy_callbacks.plot import (
    MetricsFileError,
    distinct_labels,
    figure,
    plot_curves,
    read_curve,
)


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def lightning_rows() -> list[dict[str, object]]:
    """What Lightning's CSVLogger writes: energy rows (on_step and on_epoch columns) and
    evaluation rows apart."""
    return [
        {"epoch": 0, "step": 9, "plasticity/energy_step": 8.0, "plasticity/updates_step": 100},
        {"epoch": 0, "step": 19, "plasticity/energy_step": 15.0, "plasticity/updates_step": 200},
        {"epoch": 0, "step": 21, "val_acc": 0.6},  # paired with the epoch total below
        {"epoch": 0, "step": 21, "plasticity/energy_epoch": 16.0, "plasticity/updates_epoch": 210},
        {"epoch": 1, "step": 29, "plasticity/energy_step": 21.0, "plasticity/updates_step": 300},
        {"epoch": 1, "step": 43, "val_acc": 0.8},  # after step 39's energy, logged below
        {"epoch": 1, "step": 39, "plasticity/energy_step": 25.0, "plasticity/updates_step": 400},
    ]


def test_the_older_single_column_layout_reads_too(tmp_path):
    rows = [{"step": 9, "plasticity/energy": 8.0}, {"step": 9, "val_acc": 0.5}]
    assert read_curve(write_csv(tmp_path / "metrics.csv", rows)).energy == (8.0,)


def keras_rows() -> list[dict[str, object]]:
    return [
        {"epoch": e, "accuracy": a, "plasticity/energy": m1, "val_accuracy": v}
        for e, (a, m1, v) in enumerate([(0.5, 10.0, 0.55), (0.7, 18.0, 0.75), (0.8, 22.0, "")])
    ]


def test_lightning_layout_pairs_each_evaluation_with_the_energy_before_it(tmp_path):
    curve = read_curve(write_csv(tmp_path / "lazy" / "metrics.csv", lightning_rows()))
    assert curve.label == "lazy" and curve.accuracy_column == "val_acc"
    assert curve.accuracy == (0.6, 0.8)
    assert curve.energy == (16.0, 25.0)
    assert curve.updates == (210.0, 400.0)


def test_keras_layout_reads_one_row_per_epoch(tmp_path):
    curve = read_curve(write_csv(tmp_path / "log.csv", keras_rows()), label="mine")
    assert curve.label == curve.rule == "mine"
    assert curve.accuracy_column == "val_accuracy"  # validation before training accuracy
    assert curve.accuracy == (0.55, 0.75)  # the epoch without val_accuracy is left out
    assert curve.energy == (10.0, 18.0)
    assert curve.updates is None  # not logged


def test_accuracy_column_can_be_named(tmp_path):
    curve = read_curve(write_csv(tmp_path / "log.csv", keras_rows()), accuracy="accuracy")
    assert curve.accuracy == (0.5, 0.7, 0.8)


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([{"epoch": 0, "val_acc": 0.5}], {}, "has no plasticity/energy column"),
        ([{"epoch": 0, "plasticity/energy": 1.0}], {}, "has no accuracy column"),
        (keras_rows(), {"accuracy": "top5"}, "has no column 'top5'"),
        (
            [{"step": 5, "val_acc": 0.5}, {"step": 9, "plasticity/energy": 1.0}],
            {},
            "no row has both val_acc and an energy logged at or before it",
        ),
    ],
)
def test_unusable_files_say_why(rows, kwargs, message, tmp_path):
    with pytest.raises(MetricsFileError, match=message):
        read_curve(write_csv(tmp_path / "m.csv", rows), **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(MetricsFileError, match="no such file"):
        read_curve(tmp_path / "absent.csv")


def test_distinct_labels():
    assert distinct_labels(["r/backprop/metrics.csv", "r/lazy/metrics.csv"]) == ["backprop", "lazy"]
    assert distinct_labels(["r/lightning/lazy/metrics.csv", "r/keras/lazy.csv"]) == [
        "lightning",
        "keras",
    ]
    assert distinct_labels(["r/lightning/lazy/metrics.csv", "r/keras/combined.csv"]) == [
        "lightning/lazy",
        "keras/combined",
    ]
    assert distinct_labels(["runs/a/log.csv"]) == ["log"]
    assert distinct_labels(["log.csv", "log.csv"]) == ["log.csv", "log.csv"]


def test_figure_draws_one_line_per_curve_styled_by_rule_and_framework(tmp_path):
    lightning = write_csv(tmp_path / "l" / "metrics.csv", lightning_rows())
    curves = [
        read_curve(lightning, label="a (lightning)", rule="a", framework="lightning"),
        read_curve(lightning, label="b (lightning)", rule="b", framework="lightning"),
        read_curve(lightning, label="a (keras)", rule="a", framework="keras"),
    ]
    fig = figure(curves, title="t")
    m1_axes, m0_axes = fig.axes
    assert [line.get_label() for line in m1_axes.lines] == [c.label for c in curves]
    colours = [line.get_color() for line in m1_axes.lines]
    assert colours[0] == colours[2] != colours[1]
    assert [line.get_linestyle() for line in m1_axes.lines] == ["-", "-", "--"]
    assert m1_axes.get_xscale() == "log" and len(m0_axes.lines) == 3
    assert list(m1_axes.lines[0].get_xdata()) == [16.0, 25.0]
    png = plot_curves(curves, tmp_path / "out" / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_figure_without_updates_has_one_panel(tmp_path):
    curve = read_curve(write_csv(tmp_path / "log.csv", keras_rows()))
    assert len(figure([curve]).axes) == 1


def test_plot_command(tmp_path, capsys):
    a = write_csv(tmp_path / "runs" / "backprop" / "metrics.csv", lightning_rows())
    b = write_csv(tmp_path / "runs" / "lazy.csv", keras_rows())
    png = tmp_path / "p.png"
    assert main(["plot", str(a), str(b), "--out", str(png), "--title", "x"]) == 0
    out = capsys.readouterr().out
    assert "│ backprop " in out and "│ lazy " in out and f"Plot saved to {png}" in out
    assert png.is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "one,two"], "--labels gives 2 labels for 1 files"),
        (["--accuracy", "nope"], "has no column 'nope'"),
    ],
)
def test_plot_command_errors_are_one_line(extra, message, tmp_path, capsys):
    a = write_csv(tmp_path / "log.csv", keras_rows())
    assert main(["plot", str(a), *extra, "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("energy-callbacks plot: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "p.png").exists()
