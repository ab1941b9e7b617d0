"""``energy-callbacks demo``: real training through Lightning and Keras on the digits."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from energy_callbacks.cli import main
from energy_callbacks.demo import DemoConfig, DemoConfigError
from energy_callbacks.plot import read_curve

SMALL = ["--hidden", "32", "--epochs", "2"]
RULES = ("backprop", "combined", "lazy")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def lightning_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = run_cli(["demo", *SMALL, "--frameworks", "lightning", "--out", str(out)])
    assert code == 0, stderr
    return out, stdout


def test_demo_prints_the_table_and_saves_the_plot(lightning_demo):
    out, stdout = lightning_demo
    assert "digits: 1347 train / 450 test samples" in stdout
    for column in ("test acc", "M1", "M0", "M1_min", "inefficiency", "M1 saved", "M0 saved"):
        assert column in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("│ lightning")]
    assert [row.split("│")[2].strip() for row in rows] == list(RULES)
    assert stdout.count("86/86 batches") == 3  # a progress bar per run: 2 epochs x 43 batches
    plot = out / "demo.png"
    assert f"Plot saved to {plot}" in stdout.replace("\n", "")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_logs_are_lightning_csvs_the_plot_reads(lightning_demo):
    out, _ = lightning_demo
    curves = {r: read_curve(out / "lightning" / r / "metrics.csv") for r in RULES}
    for curve in curves.values():
        assert len(curve.accuracy) == 2  # one evaluation per epoch
        assert curve.energy[0] < curve.energy[1]
        assert all(0 < a <= 1 for a in curve.accuracy)
    # the energy-saving rules spend less than backprop
    assert curves["combined"].updates[-1] < curves["backprop"].updates[-1] / 10
    assert curves["lazy"].energy[-1] < curves["backprop"].energy[-1]


def test_plot_command_redraws_the_demo_logs(lightning_demo, tmp_path):
    out, _ = lightning_demo
    files = [str(out / "lightning" / r / "metrics.csv") for r in RULES]
    png = tmp_path / "again.png"
    code, stdout, stderr = run_cli(["plot", *files, "--out", str(png)])
    assert code == 0, stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    for rule in RULES:  # labels: the directories that tell the files apart
        assert f"│ {rule} " in stdout


def test_demo_without_keras_trains_lightning_only(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "keras" else real(name, *a)
    )
    argv = ["demo", "--hidden", "8", "--epochs", "1", "--rules", "backprop", "--out", str(tmp_path)]
    code, stdout, _ = run_cli(argv)
    assert code == 0
    assert "Keras is not installed: Lightning only" in stdout
    assert not (tmp_path / "keras").exists()


LIGHTNING_AND_KERAS = """
import json, sys
from pathlib import Path
from energy_callbacks.demo import DemoConfig, run_demo
config = DemoConfig(hidden=32, epochs=2, rules=tuple(sys.argv[3].split(",")),
                    frameworks=("keras",), out=Path(sys.argv[1]))
results = run_demo(config)
json.dump({r.rule: [r.framework, r.report.m1, r.report.m0, r.accuracy] for r in results},
          open(sys.argv[2], "w"))
"""


@pytest.mark.parametrize(
    ("backend", "rules"),
    # every rule on the default backend; on the others backprop pins the batch order,
    # which depends on how each backend peeks at the data (tests/keras covers the rules)
    [("tensorflow", RULES), ("jax", ("backprop",)), ("torch", ("backprop",))],
)
def test_keras_trains_the_same_network_as_lightning(backend, rules, lightning_demo, tmp_path):
    """Same initial weights, same batches in the same order: the same energy, per backend."""
    out, _ = lightning_demo
    result = tmp_path / "keras.json"
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run(
        [sys.executable, "-c", LIGHTNING_AND_KERAS, str(tmp_path), str(result), ",".join(rules)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    keras_runs = json.loads(result.read_text())
    assert sorted(keras_runs) == sorted(rules)
    for rule in rules:
        framework, m1, m0, _ = keras_runs[rule]
        assert framework == f"keras/{backend}"
        lightning = read_curve(out / "lightning" / rule / "metrics.csv")
        keras = read_curve(tmp_path / "keras" / f"{rule}.csv")
        assert keras.accuracy == pytest.approx(lightning.accuracy, abs=0.01)
        assert m1 == pytest.approx(lightning.energy[-1], rel=1e-3)
        assert m0 == pytest.approx(lightning.updates[-1], rel=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "0"], "--hidden must be >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--rules", "backprop,fastest"], "--rules: unknown rule 'fastest'; choose from backprop"),
        (["--data-dir", "/tmp"], "--data-dir goes with --dataset idx"),
        (["--dataset", "idx", "--data-dir", "/no/such/dir"], "No such directory in /no/such/dir"),
    ],
)
def test_demo_reports_bad_settings_in_one_line(argv, message, tmp_path):
    code, stdout, stderr = run_cli(
        ["demo", *argv, "--frameworks", "lightning", "--out", str(tmp_path)]
    )
    assert code == 2
    assert stderr.startswith("energy-callbacks demo: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_demo_rejects_an_unknown_framework(tmp_path):
    code, _, stderr = run_cli(["demo", "--frameworks", "lightning,mxnet", "--out", str(tmp_path)])
    assert code == 2
    assert "--frameworks: got lightning,mxnet; choose from lightning, keras" in stderr


def test_demo_reports_a_corrupt_idx_file_in_one_line(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (data / stem).write_bytes(b"\0\0\x08\x03garbage")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data / stem).write_bytes(b"")
    argv = ["demo", "--dataset", "idx", "--data-dir", str(data), "--frameworks", "lightning"]
    code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "out")])
    assert code == 2
    assert "train-images-idx3-ubyte is truncated" in stderr and stderr.count("\n") == 1


def test_config_names_the_field():
    with pytest.raises(DemoConfigError, match="--batch-size must be >= 1"):
        DemoConfig(batch_size=0)
    with pytest.raises(DemoConfigError, match="--train-samples must be >= 1"):
        DemoConfig(train_samples=0)
    assert isinstance(DemoConfigError("x"), ValueError)
    assert Path(DemoConfig().out) == Path("demo-results")
