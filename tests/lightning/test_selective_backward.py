"""``PlasticityCallback(skip_backward=True)``: the batch is judged without gradients and
``training_step`` runs on the samples that learn only (SelectiveBackprop's mechanism)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import IndexedData, PaperModule, trainer
from torch import nn

from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.reference import PaperMLP
from energy_callbacks.torch_selective import select_rows


class Recording(PaperModule):
    """The paper MLP that records the batch size of every training_step it runs and the
    rows that reach the backward pass of its first layer."""

    def __init__(self, ref, **kwargs) -> None:
        super().__init__(ref, **kwargs)
        self.step_sizes: list[int] = []
        self.backward_rows: list[int] = []
        self.net[0].register_full_backward_hook(
            lambda m, gi, go: self.backward_rows.append(go[0].shape[0])
        )

    def training_step(self, batch, batch_idx):
        self.step_sizes.append(int(batch["x"].shape[0]))
        return super().training_step(batch, batch_idx)


def fit(digits, *, batch_size, samples="lazy", n=96, epochs=1, lr=0.05, **kwargs):
    x, y, _, _ = digits
    module = Recording(PaperMLP(64, 24, 10, seed=1), lr=lr)
    data = IndexedData(x, y, np.arange(n))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    callback = PlasticityCallback(samples=samples, **kwargs)
    trainer(max_epochs=epochs, callbacks=[callback]).fit(module, loader)
    return module, callback.report()


def test_at_batch_one_it_is_the_gradient_gate_without_the_rejected_backward(digits):
    gated, want = fit(digits, batch_size=1, samples="lazy")
    selective, got = fit(digits, batch_size=1, samples="lazy", skip_backward=True)
    for a, b in zip(gated.parameters(), selective.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (got.m1, got.m0, got.samples_learned, got.samples_seen) == pytest.approx(
        (want.m1, want.m0, want.samples_learned, want.samples_seen), rel=1e-6
    )
    assert 0 < got.samples_learned < got.samples_seen == 96
    # only the learners ran training_step and a backward pass
    assert selective.step_sizes == [1] * got.samples_learned
    assert selective.backward_rows == [1] * got.samples_learned
    assert len(gated.step_sizes) == 96


def test_a_batch_trains_on_its_mistakes_only_with_their_mean_loss(digits):
    x, y, _, _ = digits
    ref = PaperMLP(64, 24, 10, seed=1)
    start = PaperModule(ref)
    xb, yb = torch.from_numpy(x[:32]), torch.from_numpy(y[:32])
    with torch.no_grad():
        wrong = start(xb).argmax(1) != yb
    m = int(wrong.sum())
    assert 0 < m < 32
    start.training_step({"x": xb[wrong], "y": yb[wrong]}, 0).backward()
    want = [p.detach() - 0.05 * p.grad for p in start.parameters()]

    module, report = fit(digits, batch_size=32, n=32, skip_backward=True)
    assert module.step_sizes == [m] and module.backward_rows == [m]
    for p, w in zip(module.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    assert (report.samples_seen, report.samples_learned) == (32, m)


def test_memorized_mistakes_and_batches_nobody_learns_from(digits):
    module, report = fit(digits, batch_size=16, samples="mistakes", epochs=3, skip_backward=True)
    # a sample once wrong keeps learning: training_step sizes never drop below the memory
    assert report.samples_seen == 3 * 96
    assert sum(module.step_sizes) == report.samples_learned
    # a batch where nobody learns: no training_step, no step, the weights stay
    x, y, _, _ = digits
    perfect = PaperModule(PaperMLP(64, 24, 10, seed=1))
    with torch.no_grad():
        right = (perfect(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).numpy()
    order = np.flatnonzero(right)[:8]
    before = [p.detach().clone() for p in perfect.parameters()]
    loader = torch.utils.data.DataLoader(IndexedData(x, y, order), batch_size=8)
    callback = PlasticityCallback(samples="lazy", skip_backward=True)
    trainer(max_epochs=1, callbacks=[callback]).fit(perfect, loader)
    for a, b in zip(perfect.parameters(), before, strict=True):
        assert torch.equal(a, b)
    assert callback.report().samples_learned == 0 and callback.report().m0 == 0


def test_tuples_namedtuples_and_arrays_are_cut_to_the_learners():
    keep = torch.tensor([True, False, True])
    batch = {"x": torch.arange(6).reshape(3, 2), "meta": ("tag", np.arange(3)), "k": 7}
    out = select_rows(batch, keep, 3)
    assert out["x"].tolist() == [[0, 1], [4, 5]] and out["k"] == 7
    assert out["meta"][0] == "tag" and out["meta"][1].tolist() == [0, 2]
    assert select_rows((torch.zeros(3), torch.ones(2)), keep, 3)[1].shape == (2,)


class TokenModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10)

    def forward(self, x):
        return self.out(self.emb(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_what_it_cannot_do_is_refused():
    with pytest.raises(ValueError, match="skip_backward=True skips the backward.*samples='lazy'"):
        PlasticityCallback(skip_backward=True)
    with pytest.raises(ValueError, match="inputs= is only used with skip_backward=True"):
        PlasticityCallback(samples="lazy", inputs=lambda b: b[0])
    with pytest.raises(ValueError, match="skip_backward must be"):
        PlasticityCallback(samples="lazy", skip_backward="yes")
    tokens = torch.randint(0, 10, (8, 5))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, tokens), 4)
    callback = PlasticityCallback(samples="lazy", skip_backward=True)
    with pytest.raises(ValueError, match="one decision per sample.*skip_backward=False"):
        trainer(max_epochs=1, callbacks=[callback]).fit(TokenModel(), loader)


def test_a_dict_batch_without_inputs_names_the_fix(digits):
    x, y, _, _ = digits

    class Keyed(PaperModule):
        def training_step(self, batch, batch_idx):
            return super().training_step({"x": batch["pixels"], "y": batch["y"]}, batch_idx)

    data = [{"pixels": torch.from_numpy(x[i]), "y": int(y[i])} for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = Keyed(PaperMLP(64, 24, 10, seed=1))
    callback = PlasticityCallback(samples="lazy", skip_backward=True)
    with pytest.raises(ValueError, match="cannot find the inputs.*inputs=<callable"):
        trainer(max_epochs=1, callbacks=[callback]).fit(module, loader)
    callback = PlasticityCallback(samples="lazy", skip_backward=True, inputs=lambda b: b["pixels"])
    trainer(max_epochs=1, callbacks=[callback]).fit(module, loader)
    assert callback.report().samples_seen == 8
    assert "training_step" not in module.__dict__  # teardown restored the module's own
