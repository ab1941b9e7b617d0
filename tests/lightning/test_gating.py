"""Sample gates on unmodified models: exact gradients, untouched state, and the limits."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import trainer
from torch import nn

from energy_callbacks import Margin, MemorizedMistakes, Plasticity
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.torch import attach


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def test_gradient_drops_gated_out_terms_and_keeps_the_normalization():
    model, twin = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    handle.gate_batch(y)
    nn.functional.cross_entropy(model(x), y).backward()
    wrong = twin(x).argmax(1) != y
    assert 0 < wrong.sum() < 16
    # The user's loss is a mean over 16 samples: the kept terms are still divided by 16.
    per_sample = nn.functional.cross_entropy(twin(x), y, reduction="none")
    (per_sample * wrong).sum().div(16).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    assert handle.report().samples_learned == int(wrong.sum())


def test_a_batch_nobody_learns_changes_nothing_and_skips_backward():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    x = torch.randn(32, 6)
    # A first step that learns, so Adam has state to disturb.
    y_wrong = (model(x).argmax(1) + 1) % 3
    handle.gate_batch(y_wrong)
    nn.functional.cross_entropy(model(x), y_wrong).backward()
    opt.step()
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    # Now every sample is right: no gradient, no step, no Adam count, no weight decay.
    y_right = model(x).argmax(1)
    handle.gate_batch(y_right)
    loss = nn.functional.cross_entropy(model(x), y_right)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # the backward pass was free
    opt.step()
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert handle.report().steps == 1


def test_accumulated_batches_step_unless_all_were_empty():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    x = torch.randn(8, 6)
    right = model(x).argmax(1)
    for y in (right, (right + 1) % 3):  # an empty batch, then one that learns
        handle.gate_batch(y)
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert handle.report().steps == 1


def test_forgetting_gate_batch_is_an_error_not_a_silent_skip():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, opt, Plasticity(samples="lazy"))
    nn.functional.cross_entropy(
        model(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long)
    ).backward()
    with pytest.raises(RuntimeError, match="gate_batch"):
        opt.step()


def test_custom_outputs_callable_and_tuple_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, x):
            logits = self.body(x)
            return {"scores": logits, "aux": logits.sum()}

    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples=Margin(0.9)), outputs=lambda out: out["scores"])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    handle.gate_batch(y)
    nn.functional.cross_entropy(model(x)["scores"], y).backward()
    opt.step()
    assert handle.report().samples_seen == 8
    other = TwoHeads()
    bad = attach(other, torch.optim.SGD(other.parameters(), lr=0.1), Plasticity(samples="lazy"))
    bad.gate_batch(y)
    with pytest.raises(TypeError, match="outputs="):
        other(x)  # a dict without "logits": the default cannot find them


def test_gate_works_under_torch_compile():
    """torch.compile (dynamo) runs the Python gate in a graph break; results are unchanged."""
    results = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        handle = attach(model, opt, Plasticity(samples="lazy", synapses=0.5))
        run = torch.compile(model, backend="eager") if compile_it else model
        g = torch.Generator().manual_seed(0)
        for _ in range(6):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            handle.gate_batch(y)
            opt.zero_grad()
            nn.functional.cross_entropy(run(x), y).backward()
            opt.step()
        results.append(([p.detach().clone() for p in model.parameters()], handle.report()))
    (w0, r0), (w1, r1) = results
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert r0.m1 == r1.m1 and r0.samples_learned == r1.samples_learned


class Classifier(pl.LightningModule):
    def __init__(self, call_forward: bool = True):
        super().__init__()
        self.net = mlp()
        self.call_forward = call_forward

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        out = self(x) if self.call_forward else self.net[2](self.net[1](self.net[0](x)))
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(n=64, batch_size=8, with_ids=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3]).argmax(1)
    if with_ids:
        data = [{"x": x[i], "y": y[i], "index": i} for i in range(n)]
        return torch.utils.data.DataLoader(data, batch_size=batch_size)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def test_lightning_module_that_bypasses_forward_gets_a_clear_error():
    callback = PlasticityCallback(samples="lazy")
    with pytest.raises(RuntimeError, match="training_step must call self"):
        trainer(max_epochs=1, callbacks=[callback]).fit(Classifier(call_forward=False), loader())


def test_lightning_dict_batches_with_ids_and_memorized_mistakes():
    class DictClassifier(Classifier):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    callback = PlasticityCallback(samples="mistakes")
    trainer(max_epochs=3, callbacks=[callback]).fit(DictClassifier(), loader(with_ids=True))
    report = callback.report()
    memory = callback.plasticity.samples.memory
    assert report.samples_seen == 3 * 64
    assert 0 < memory.count() <= 64
    # Every flagged sample learns in every later epoch: at least count() per epoch after the first.
    assert report.samples_learned >= memory.count()


def test_lightning_mistakes_without_ids_says_how_to_give_them():
    callback = PlasticityCallback(samples=MemorizedMistakes())
    with pytest.raises(ValueError, match="sample ids"):
        trainer(max_epochs=1, callbacks=[callback]).fit(Classifier(), loader())


def test_lightning_skips_empty_batches_and_logs_the_share_learned():
    callback = PlasticityCallback(samples="lazy", log_every_n_steps=1)
    t = trainer(max_epochs=4, callbacks=[callback])
    t.fit(Classifier(), loader())
    report = callback.report()
    assert report.steps < 4 * 8  # some batches had no mistake
    share = float(t.callback_metrics["plasticity/samples_learned"])
    assert 0 <= share < 1
    assert float(t.callback_metrics["plasticity/energy"]) == pytest.approx(report.m1, rel=1e-6)
    assert np.isfinite(float(t.callback_metrics["plasticity/inefficiency"]))


def test_gate_needs_one_prediction_per_sample_or_per_token():
    model = nn.Sequential(nn.Linear(6, 24), nn.Unflatten(1, (2, 4, 3)))  # (batch, 2, 4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    handle.gate_batch(torch.zeros(2, 2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, tokens, classes\)"):
        model(torch.randn(2, 6))


class LBFGSClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3)


def test_lbfgs_with_a_sample_gate_is_refused_when_fit_starts_and_leaves_no_hook():
    module = LBFGSClassifier()
    x = torch.randn(32, 6)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, :3].argmax(1)), batch_size=8
    )
    callback = PlasticityCallback(samples="lazy")
    with pytest.raises(ValueError, match="LBFGS evaluates its closure several times"):
        trainer(max_epochs=1, callbacks=[callback]).fit(module, data)
    assert not module._forward_hooks
    measured = PlasticityCallback(synapses=0.5)  # without a gate LBFGS is measured and masked
    trainer(max_epochs=1, callbacks=[measured]).fit(module, data)
    assert measured.report().steps == 4
