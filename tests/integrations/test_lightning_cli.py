"""The LightningCLI pipeline in integrations/lightning_cli: the callback comes in by YAML."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from energy_callbacks import Lazy, TopFraction, TopUnits
from energy_callbacks.lightning import PlasticityCallback

HERE = Path(__file__).resolve().parents[2] / "integrations" / "lightning_cli"
CONFIG = HERE / "config.yaml"
LAYERS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")


@pytest.fixture(scope="module")
def train_module():
    name = "energy_callbacks_integration_lightning_cli_train"
    spec = importlib.util.spec_from_file_location(name, HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # jsonargparse resolves annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns about pytest's argv


def run(module, config: Path, tmp_path: Path):
    return module.main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )


def read_metrics(tmp_path: Path) -> list[dict[str, float]]:
    (path,) = tmp_path.rglob("metrics.csv")
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_module_does_not_know_energy_callbacks():
    assert "energy_callbacks.lightning" not in (HERE / "train.py").read_text()
    assert "PlasticityCallback" not in (HERE / "train.py").read_text()


def test_cli_yaml_drops_the_callback_in(train_module, tmp_path):
    cli = run(train_module, CONFIG, tmp_path)

    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PlasticityCallback)]
    p = callback.plasticity
    assert len(p.synapses) == 1 and type(p.synapses[0]) is TopFraction
    assert p.synapses[0].p == 0.1 and not p.synapses[0].per_unit
    assert type(p.units) is TopUnits and p.units.q == 0.5 and p.units.k is None
    assert type(p.samples) is Lazy
    assert callback.per_layer is True

    rows = read_metrics(tmp_path)
    keys = set().union(*rows)
    for key in (
        "train_loss",
        "plasticity/energy_step",  # logged on_step and on_epoch, like any self.log value
        "plasticity/energy_epoch",
        "plasticity/updates_step",
        "plasticity/updates_epoch",
        "plasticity/energy_min",
        "plasticity/inefficiency",
        "plasticity/samples_learned",
    ):
        assert key in keys, f"{key} missing from the CSV log: {sorted(keys)}"
    for layer in LAYERS:
        assert f"plasticity/energy/{layer}" in keys

    epoch_rows = [r for r in rows if "plasticity/samples_learned" in r]
    assert len(epoch_rows) == 2  # max_epochs: 2, one row per epoch end
    for r in epoch_rows:
        assert 0.0 < r["plasticity/samples_learned"] < 1.0  # lazy: correct samples skip
        assert r["plasticity/inefficiency"] >= 1.0
        assert 0.0 < r["plasticity/energy_min"] <= r["plasticity/energy_epoch"]

    report = callback.report()
    assert report.steps > 0 and report.m1 > 0
    last = epoch_rows[-1]
    per_layer = sum(last[f"plasticity/energy/{layer}"] for layer in LAYERS)
    assert per_layer == pytest.approx(report.m1, rel=1e-5)
    assert last["plasticity/energy_min"] == pytest.approx(report.m1_min, rel=1e-5)
    energy = [r["plasticity/energy_step"] for r in rows if "plasticity/energy_step" in r]
    assert energy == sorted(energy) and energy[-1] <= report.m1 * (1 + 1e-6)
    epochs = [r["plasticity/energy_epoch"] for r in rows if "plasticity/energy_epoch" in r]
    assert epochs[-1] == pytest.approx(report.m1, rel=1e-6)
    assert (
        sorted(r["plasticity/updates_step"] for r in rows if "plasticity/updates_step" in r)[-1] > 0
    )


def test_cli_bad_yaml_value_fails_before_training(train_module, tmp_path, capsys):
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["synapses"] = 1.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))

    trained = []
    cls = train_module.DigitsClassifier
    original = cls.training_step

    def spy(self, *args, **kwargs):
        trained.append(1)
        return original(self, *args, **kwargs)

    cls.training_step = spy
    try:
        with pytest.raises((ValueError, SystemExit)) as info:
            run(train_module, bad, tmp_path / "logs")
    finally:
        cls.training_step = original

    messages = []
    exc: BaseException | None = info.value
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    captured = capsys.readouterr()
    text = "\n".join([*messages, captured.out, captured.err])
    assert "TopFraction.p" in text and "1.5" in text
    assert not trained
    assert not list(tmp_path.rglob("metrics.csv"))


def test_cli_yaml_takes_rule_objects_as_class_paths(train_module, tmp_path):
    """docs/lightning.md: a rule object is a nested class_path entry."""
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["max_epochs"] = 1
    config["trainer"]["callbacks"][0]["init_args"]["units"] = {
        "class_path": "energy_callbacks.TopUnits",
        "init_args": {"k": 10, "path": True},
    }
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump(config))
    cli = run(train_module, nested, tmp_path)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PlasticityCallback)]
    units = callback.plasticity.units
    assert type(units) is TopUnits and units.k == 10 and units.q is None and units.path
    assert callback.report().steps > 0
