"""Bad batches in a Lightning run: missing targets, targets of the wrong shape or dtype,
class ids outside the outputs, sample ids that are missing, negative, fractional,
duplicated or huge. Each either stops the run at that batch with an error that says what
to pass (the weights untouched by it), or has a documented, bounded handling.

The target checks themselves: tests/core/test_targets.py. Keras: keras_checks.py.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from reliability_helpers import mlp, trainer
from torch import nn

from energy_callbacks.lightning import PlasticityCallback


class Dicts(torch.utils.data.Dataset):
    """Dict samples; ``edit(i, sample)`` spoils sample ``i`` (or the whole batch)."""

    def __init__(self, edit=None, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, :3] * 3).argmax(1)
        self.edit = edit or (lambda i, s: s)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return self.edit(i, {"x": self.x[i], "y": self.y[i], "index": i})


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.seen: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch_idx)
        out = self(batch["x"])
        return nn.functional.cross_entropy(out, batch["y"].long().clamp(0, 2).reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(edit, samples="mistakes", collate=None):
    module = Net()
    callback = PlasticityCallback(samples=samples)
    loader = torch.utils.data.DataLoader(Dicts(edit), batch_size=8, collate_fn=collate)
    return module, callback, trainer(max_epochs=1, callbacks=[callback]), loader


def in_batch(b: int):
    return lambda i: i // 8 == b


BAD = {
    "no targets": (lambda i, s: {k: v for k, v in s.items() if k != "y"}, "find the targets"),
    "targets one column short": (
        lambda i, s: s | {"y": torch.tensor([0.5, 0.5])},
        "do not fit outputs",
    ),
    "regression targets": (lambda i, s: s | {"y": torch.tensor(0.37)}, "not a class id"),
    "class id 3 of 3": (
        lambda i, s: s | {"y": torch.tensor(3) if i == 9 else s["y"]},
        r"outside \[0, 3\)",
    ),
    "class id -1": (
        lambda i, s: s | {"y": torch.tensor(-1) if i == 9 else s["y"]},
        r"outside \[0, 3\)",
    ),
    "no ids": (lambda i, s: {k: v for k, v in s.items() if k != "index"}, "needs sample ids"),
    "negative id": (lambda i, s: s | {"index": -7 if i == 9 else i}, "sample id -7 is outside"),
    "fractional ids": (lambda i, s: s | {"index": i + 0.5}, "must be integers"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_batch_stops_the_run_there_with_the_fix_and_leaves_the_weights(name):
    edit, match = BAD[name]
    first_bad = 1 if name in ("class id 3 of 3", "class id -1", "negative id") else 0
    module, callback, t, loader = run(edit)
    with pytest.raises((ValueError, TypeError), match=match):
        t.fit(module, loader)
    assert callback.plasticity.report().steps == first_bad  # the batches before it stepped
    # nothing of the bad batch reached the weights: the same run on the good batches only
    again = Net()
    if first_bad:
        good = torch.utils.data.DataLoader(Dicts(n=8 * first_bad), batch_size=8)
        t2 = trainer(max_epochs=1, callbacks=[PlasticityCallback(samples="mistakes")])
        t2.fit(again, good)
    for p, q in zip(module.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_duplicated_ids_in_a_batch_are_one_sample_shown_twice():
    """Each copy learns if it is wrong now or its id is flagged; the id is flagged if any
    copy was wrong."""
    module, callback, t, loader = run(lambda i, s: s | {"index": i // 2})
    t.fit(module, loader)
    memory = callback.plasticity.samples.memory
    assert len(memory) <= 16 and memory.count() > 0
    assert callback.report().samples_seen == 32


def test_huge_ids_are_remembered_in_a_few_bytes():
    module, callback, t, loader = run(lambda i, s: s | {"index": 10**12 + 7 * i})
    t.fit(module, loader)
    memory = callback.plasticity.samples.memory
    assert memory.count() > 0 and memory.nbytes <= 8 * 32
    assert all(int(i) >= 10**12 for i in memory.flagged())
    state = callback.state_dict()["samples"]["memory"]
    assert len(state["bits"]) == 0 and len(state["sparse"]) == memory.count()


def test_without_a_gate_batches_without_visible_targets_still_train_uncounted():
    """Documented: with samples=None the targets are only counted; a batch that has none
    trains as usual and is not counted in samples_seen."""
    module, callback, t, loader = run(
        lambda i, s: {k: v for k, v in s.items() if k != "y"} | {"label_of": s["y"]},
        samples=None,
    )

    def step(batch, batch_idx):
        return nn.functional.cross_entropy(module(batch["x"]), batch["label_of"])

    module.training_step = step
    t.fit(module, loader)
    report = callback.report()
    assert report.steps == 4 and report.samples_seen == 0 and report.m1 > 0
