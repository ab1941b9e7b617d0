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
from energy_callbacks.torch.selective import gather_rows, select_rows


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


def replay_queue(digits, *, batch_size, backward_batch, n=96, lr=0.05):
    """Plain torch: judge each loaded batch with the current weights, queue its mistakes,
    and step on the first ``backward_batch`` queued as soon as there are that many (the
    last batch trains what waits). Returns the module, the step sizes and the learners."""
    x, y, _, _ = digits
    module = PaperModule(PaperMLP(64, 24, 10, seed=1), lr=lr)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    xs, ys = torch.from_numpy(x[:n]), torch.from_numpy(y[:n]).long()
    qx, qy, sizes, learners = xs[:0], ys[:0], [], 0
    starts = range(0, n, batch_size)
    for start in starts:
        xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
        with torch.no_grad():
            wrong = module(xb).argmax(1) != yb
        qx, qy = torch.cat([qx, xb[wrong]]), torch.cat([qy, yb[wrong]])
        learners += int(wrong.sum())
        last = start == starts[-1]
        if len(qx) >= backward_batch or (last and len(qx)):
            k = min(backward_batch, len(qx))
            opt.zero_grad()
            module.training_step({"x": qx[:k], "y": qy[:k]}, 0).backward()
            opt.step()
            qx, qy = qx[k:], qy[k:]
            sizes.append(k)
    return module, sizes, learners


def test_backward_batch_queues_the_learners_and_steps_on_full_batches(digits):
    want, want_sizes, learners = replay_queue(digits, batch_size=16, backward_batch=16)
    module, report = fit(digits, batch_size=16, skip_backward=True, backward_batch=16)
    # every step but the epoch's last is a full batch of learners
    assert module.step_sizes == want_sizes and module.backward_rows == want_sizes
    assert set(want_sizes[:-1]) == {16} and len(want_sizes) < 96 // 16
    for a, b in zip(module.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (report.samples_seen, report.samples_learned) == (96, learners)
    assert report.m0 > 0


class Snapshot(pl.Callback):
    """Saves the energy callback's state and the weights after batch ``at`` (through
    torch.save / weights_only load, as a checkpoint would), then stops the fit."""

    def __init__(self, energy, at: int) -> None:
        self.energy, self.at = energy, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            import io

            buffer = io.BytesIO()
            torch.save({"energy": self.energy.state_dict(), "w": pl_module.state_dict()}, buffer)
            buffer.seek(0)
            self.saved = torch.load(buffer, weights_only=True)
            trainer.should_stop = True


def test_the_waiting_learners_survive_a_checkpoint_exactly(digits):
    x, y, _, _ = digits
    whole, whole_report = fit(digits, batch_size=8, skip_backward=True, backward_batch=24)

    energy = PlasticityCallback(samples="lazy", skip_backward=True, backward_batch=24)
    snap = Snapshot(energy, at=1)  # 16 judged, fewer than 24 learners: none trained yet
    first = Recording(PaperMLP(64, 24, 10, seed=1), lr=0.05)
    loader = torch.utils.data.DataLoader(IndexedData(x, y, np.arange(96)), batch_size=8)
    trainer(max_epochs=1, callbacks=[energy, snap]).fit(first, loader)
    queue = snap.saved["energy"]["skip_backward_queue"]
    assert sum(queue["rows"]) > 0 and first.step_sizes == []  # learners wait, untrained

    resumed = Recording(PaperMLP(64, 24, 10, seed=1), lr=0.05)
    resumed.load_state_dict(snap.saved["w"])
    energy = PlasticityCallback(samples="lazy", skip_backward=True, backward_batch=24)
    energy.load_state_dict(snap.saved["energy"])
    loader = torch.utils.data.DataLoader(IndexedData(x, y, np.arange(16, 96)), batch_size=8)
    trainer(max_epochs=1, callbacks=[energy]).fit(resumed, loader)
    assert first.step_sizes + resumed.step_sizes == whole.step_sizes
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    got = energy.report()
    assert (got.m1, got.m0, got.samples_seen, got.samples_learned) == pytest.approx(
        (whole_report.m1, whole_report.m0, whole_report.samples_seen, whole_report.samples_learned)
    )


def test_rows_of_several_batches_are_gathered_in_order():
    a = {"x": torch.arange(6).reshape(3, 2), "meta": ("tag", np.arange(3)), "k": 7}
    b = {"x": torch.arange(6, 10).reshape(2, 2), "meta": ("tag", np.arange(3, 5)), "k": 7}
    keeps = [torch.tensor([True, False, True]), torch.tensor([False, True])]
    out = gather_rows([a, b], keeps, [3, 2])
    assert out["x"].tolist() == [[0, 1], [4, 5], [8, 9]] and out["k"] == 7
    assert out["meta"][0] == "tag" and out["meta"][1].tolist() == [0, 2, 4]
    # a leaf that is not batch-major in every batch is kept as it is in the last one
    shared = torch.zeros(5)
    got = gather_rows([(torch.ones(3), shared), (torch.ones(2), shared)], keeps, [3, 2])
    assert got[0].shape == (3,) and got[1] is shared


def test_backward_batch_without_skip_backward_is_refused():
    with pytest.raises(ValueError, match="backward_batch=.*set skip_backward=True"):
        PlasticityCallback(samples="lazy", backward_batch=32)
    with pytest.raises(ValueError, match="PlasticityCallback.backward_batch"):
        PlasticityCallback(samples="lazy", skip_backward=True, backward_batch=0)


def test_the_step_before_max_steps_trains_what_waits(digits):
    x, y, _, _ = digits
    module = Recording(PaperMLP(64, 24, 10, seed=1), lr=0.05)
    loader = torch.utils.data.DataLoader(IndexedData(x, y, np.arange(96)), batch_size=8)
    energy = PlasticityCallback(samples="lazy", skip_backward=True, backward_batch=24)
    # Lightning's global_step counts every loaded batch, the skipped steps too: the
    # second batch ends the fit, and trains the learners of both, fewer than 24
    trainer(max_steps=2, callbacks=[energy]).fit(module, loader)
    report = energy.report()
    assert len(module.step_sizes) == 1 and 0 < module.step_sizes[0] < 24
    # every learner judged was trained, none is left in the state
    assert report.samples_learned == sum(module.step_sizes)
    assert "skip_backward_queue" not in energy.state_dict()
