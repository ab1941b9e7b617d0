"""``energy-callbacks reproduce caching``: a tiny sweep through the Lightning callback,
its CSV, table and plot, resume, and the command line's checks."""

from __future__ import annotations

import csv

import pytest

from energy_callbacks.cli import main
from energy_callbacks.data import FASHION_MNIST_DIR
from energy_callbacks.reproduce import Config, load_data, reproduce
from energy_callbacks.reproduce.caching import CACHING_COLUMNS, EVERY_UPDATE, caching_table

needs_data = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def tiny():
    return load_data(Config()).subset(2000, 500)


def small(tmp_path, **extra):
    return Config(
        quick=True,
        out=tmp_path,
        sizes=(20,),
        max_samples=600,
        eval_every=200,
        target=0.5,
        extra={"thetas": "0.003,0.03", "taus": "inf", "maintenance_costs": "1e-3", **extra},
    )


@needs_data
@pytest.mark.data
def test_tiny_caching_sweep_saves_energy_at_equal_accuracy(tmp_path, tiny):
    table, path = reproduce("caching", small(tmp_path), data=tiny, show_progress=False)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CACHING_COLUMNS
        rows = list(reader)
    assert [r["rule"] for r in rows] == [EVERY_UPDATE, "caching", "caching"]
    base, *cached = rows
    assert float(base["energy"]) == float(base["m1"])
    assert int(base["consolidations"]) == int(base["m0"])
    for r in cached:
        energy = float(r["energy_consolidation"]) + float(r["energy_maintenance"])
        assert float(r["energy"]) == pytest.approx(energy)
        # tau = inf: the weights learn exactly as every update, so the runs stop together
        assert r["samples"] == base["samples"] and r["accuracy"] == base["accuracy"]
        assert float(r["m1"]) == pytest.approx(float(base["m1"]), rel=1e-9)
        assert float(r["m1_min"]) <= float(r["energy_consolidation"]) * (1 + 1e-6)
        assert float(r["energy"]) < float(base["energy"])
    assert "Best saving at equal accuracy" in table and "| every update | 1/1 |" in table
    assert (tmp_path / "caching.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun trains nothing and gives the same table
    again, _ = reproduce("caching", small(tmp_path), data=tiny, show_progress=False)
    assert again == table


def test_the_table_compares_only_runs_that_reached_the_target():
    rows = [
        dict(rule=EVERY_UPDATE, theta="", tau="", maintenance_cost="", reached=True, energy=100.0),
        dict(rule="caching", theta=0.01, tau=float("inf"), maintenance_cost=1e-3, reached=True,
             energy=10.0),
        dict(rule="caching", theta=0.1, tau=50.0, maintenance_cost=1e-3, reached=False,
             energy=1.0),
    ]  # fmt: skip
    for r in rows:
        r.update(samples_to_target=1, accuracy=0.9, energy_consolidation=1.0,
                 energy_maintenance=0.0, consolidations=1, m1=1.0, m1_min=1.0)  # fmt: skip
    text = caching_table(rows)
    assert "theta=0.01 tau=inf c=0.001 | 1/1" in text and "| 10x |" in text
    assert "theta=0.1 tau=50 c=0.001 | 0/1" in text
    assert "Best saving at equal accuracy: 10x (theta=0.01 tau=inf c=0.001)" in text


def test_bad_sweep_values_fail_before_training(tmp_path, capsys):
    args = ["reproduce", "caching", "--quick", "--out", str(tmp_path)]
    assert main([*args, "--thetas", "0.01,big"]) == 2
    assert "--thetas takes comma-separated numbers" in capsys.readouterr().err
    assert main([*args, "--taus", "0.5"]) == 2
    assert "Caching.tau" in capsys.readouterr().err
    assert not (tmp_path / "caching.csv").exists()


def test_a_sweep_where_no_run_reached_the_target_still_plots(tmp_path):
    from energy_callbacks.reproduce.caching import _plot
    from energy_callbacks.reproduce.report import write_outputs

    rows = [
        dict(rule=rule, theta=theta, tau=float("inf"), maintenance_cost=1e-3, reached=False,
             energy=5.0)
        for rule, theta in ((EVERY_UPDATE, ""), ("caching", 0.01))
    ]  # fmt: skip
    png = write_outputs(tmp_path, "caching", "table", lambda fig: _plot(fig, rows))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
