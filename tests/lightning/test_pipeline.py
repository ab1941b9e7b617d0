"""PlasticityCallback in Lightning pipelines: what is logged and when, skipped batches,
compiled modules fitted twice, fine-tuning that unfreezes layers, configuration."""

from __future__ import annotations

import csv
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import trainer
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from energy_callbacks import TopFraction, TopUnits
from energy_callbacks.core import keep_count
from energy_callbacks.lightning import PlasticityCallback


class Classifier(pl.LightningModule):
    def __init__(self, skip_every: int = 0, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
        self.head = nn.Linear(12, 3)
        self.skip_every = skip_every
        self.scheduler = scheduler

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        if self.skip_every and batch_idx % self.skip_every == 0:
            return None  # Lightning skips the batch
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def loader(n: int = 48, batch_size: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = x[:, :3].argmax(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def test_energy_is_logged_every_step_even_in_a_run_shorter_than_log_every_n_steps(tmp_path):
    callback = PlasticityCallback(synapses=0.5)
    t = trainer(max_epochs=2, callbacks=[callback], logger=CSVLogger(tmp_path, name="run"))
    t.fit(Classifier(), loader())  # 12 steps < log_every_n_steps = 50
    report = callback.report()
    assert float(t.callback_metrics["plasticity/energy"]) == pytest.approx(report.m1, rel=1e-6)
    assert float(t.callback_metrics["plasticity/updates"]) == report.m0
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    epochs = [float(r["plasticity/energy_epoch"]) for r in rows if r.get("plasticity/energy_epoch")]
    assert len(epochs) == 2 and epochs[-1] == pytest.approx(report.m1, rel=1e-6)
    assert epochs[0] < epochs[1]  # the total at each epoch's end, not a mean over steps


def test_counts_above_2_to_the_24_are_logged_exactly(tmp_path):
    """M0 reaches 1e10 in the paper runs: float32 logs would round it (2**24 + 1 is no
    float32). Resume a run whose totals are past 2**40, then log its counts."""
    module = Classifier()
    first = PlasticityCallback()
    trainer(max_epochs=1, callbacks=[first]).fit(module, loader())
    state = first.state_dict()
    state["energy"]["m0"][0] += 2**40 + 1  # an odd count far past float32's 2**24
    state["skipped_steps"] = 2**25 + 1
    second = PlasticityCallback()
    second.load_state_dict(state)
    logger = CSVLogger(tmp_path, name="run")
    t = trainer(max_epochs=2, callbacks=[second], logger=logger, log_every_n_steps=1)
    t.fit(module, loader())
    report = second.report()
    assert report.m0 > 2**40 and report.m0 % 2 == 1
    logged = t.callback_metrics["plasticity/updates"]
    assert logged.dtype == torch.float64 and int(logged) == report.m0
    assert int(t.callback_metrics["plasticity/skipped_steps"]) == report.skipped_steps
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    steps = [r["plasticity/updates_step"] for r in rows if r.get("plasticity/updates_step")]
    assert int(float(steps[-1])) == report.m0
    epochs = [r["plasticity/updates_epoch"] for r in rows if r.get("plasticity/updates_epoch")]
    assert int(float(epochs[-1])) == report.m0


def test_a_report_before_any_training_says_where_the_figures_are():
    with pytest.raises(RuntimeError, match="trained nothing in this process.*callback_metrics"):
        PlasticityCallback(synapses=0.5).report()


def test_a_checkpoint_filename_with_the_energy_makes_no_subdirectory(tmp_path):
    """A key with a slash in a ModelCheckpoint filename: auto_insert_metric_name=False."""
    energy = PlasticityCallback(synapses=0.5)
    # --8<-- [start:checkpoint]
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        filename="epoch{epoch}-energy{plasticity/energy:.3f}",
        auto_insert_metric_name=False,  # else the name holds "plasticity/energy=": a folder
        monitor="plasticity/energy",
        mode="min",
    )
    # --8<-- [end:checkpoint]
    trainer(max_epochs=1, callbacks=[energy, checkpoint], enable_checkpointing=True).fit(
        Classifier(), loader()
    )
    files = [p.relative_to(tmp_path) for p in tmp_path.rglob("*.ckpt")]
    assert len(files) == 1 and len(files[0].parts) == 1, files
    assert files[0].name == f"epoch0-energy{energy.report().m1:.3f}.ckpt"


def test_logged_without_a_logger_and_usable_by_early_stopping():
    callback = PlasticityCallback(synapses=0.5)
    stop = EarlyStopping(monitor="plasticity/energy", mode="max", stopping_threshold=1e-9)
    t = trainer(max_epochs=5, callbacks=[callback, stop])
    t.fit(Classifier(), loader())
    assert t.current_epoch == 1  # stopped after the first epoch's value crossed the threshold
    assert "plasticity/energy" in t.callback_metrics


def test_a_training_step_that_returns_none_skips_the_batch_under_a_gate():
    callback = PlasticityCallback(samples="lazy")
    t = trainer(max_epochs=1, callbacks=[callback])
    t.fit(Classifier(skip_every=2), loader())
    report = callback.report()
    assert report.samples_seen == 3 * 8  # only the batches that ran their forward pass
    assert report.steps <= 3


def test_no_scheduler_warning_when_a_gate_wraps_the_step():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_epochs=1, callbacks=[PlasticityCallback(samples="lazy")]).fit(
            Classifier(scheduler=True), loader()
        )
    assert not [w for w in caught if "lr_scheduler" in str(w.message)], [
        str(w.message) for w in caught
    ]


def test_a_compiled_module_fitted_again_with_the_callback_is_gated():
    torch._dynamo.reset()
    module = Classifier()
    compiled = torch.compile(module, backend="eager")
    trainer(max_epochs=1).fit(compiled, loader())
    callback = PlasticityCallback(samples="lazy", units=TopUnits(0.5))
    with pytest.warns(RuntimeWarning, match="dynamo"):
        trainer(max_epochs=1, callbacks=[callback]).fit(compiled, loader())
    assert callback.report().samples_seen == 48


class Unfreeze(BaseFinetuning):
    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.1)


class Snapshots(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed = {
            n: int((p != self.before[n]).sum()) for n, p in pl_module.named_parameters()
        }


def test_layers_unfrozen_by_base_finetuning_are_masked_and_measured():
    class Frozen(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)

    callback = PlasticityCallback(synapses=TopFraction(0.25), per_layer=True)
    snaps = Snapshots()
    t = trainer(max_epochs=2, callbacks=[Unfreeze(), callback, snaps])
    t.fit(Frozen(), loader())
    report = callback.report()
    assert report.per_layer["backbone.0.weight"].m1 > 0
    assert snaps.changed["backbone.0.weight"] == keep_count(0.25, 72)
    moved = sum(
        (p.detach() - snaps.start[n]).abs().sum().item()
        for n, p in t.lightning_module.named_parameters()
        if n.startswith("backbone")
    )
    backbone = sum(e.m1 for n, e in report.per_layer.items() if n.startswith("backbone"))
    assert backbone >= moved * (1 - 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_layer": "no"}, "per_layer must be True or False"),
        ({"layers": [1]}, "module name"),
        ({"adjacency": [["a"]]}, "pre, post"),
        ({"ignore_index": "pad"}, "ignore_index"),
    ],
)
def test_bad_configuration_fails_at_construction_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlasticityCallback(**kwargs)


def test_one_layer_name_is_one_module_and_units_need_a_hidden_layer():
    callback = PlasticityCallback(layers="head")
    assert callback.layers == ["head"]
    with pytest.raises(ValueError, match="no hidden layer"):
        trainer(max_epochs=1, callbacks=[PlasticityCallback(units=0.5, layers="head")]).fit(
            Classifier(), loader()
        )
