"""Faults: NaN/Inf gradients and updates, NaN in the weights, and loss-scaler skips.

A step whose update holds NaN/Inf is undone and counted in ``skipped_steps``: the
run ends exactly as if that step never happened (plain SGD), with one warning for
the whole run. Steps a GradScaler skips cost 0 and are counted as skipped, with
no warning (they are how loss scaling works).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from reliability_helpers import Tiny, batches, loader, mlp, plasticity_warnings, trainer
from torch import nn

from energy_callbacks import Plasticity, TopFraction
from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.torch import attach

RULES = {
    "measure": ({}, torch.float32),
    "top-fraction": ({"synapses": 0.5}, torch.float32),
    "approximate": ({"synapses": TopFraction(0.5, approximate=True)}, torch.float32),
    "alpha=2 (numpy path)": ({"alpha": 2.0}, torch.float32),
    "float16 (numpy path)": ({"synapses": 0.5}, torch.float16),
    "bfloat16 (torch ops)": ({"synapses": 0.5}, torch.bfloat16),
}
BAD = {2: float("nan"), 5: float("inf"), 6: float("nan")}


def train(rule: dict, dtype: torch.dtype, bad: dict[int, float], leave_out=()):
    """10 SGD steps; ``bad`` multiplies some losses (NaN/inf), ``leave_out`` skips batches."""
    model = mlp(dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(**rule))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches(10)):
            if i in leave_out:
                continue
            opt.zero_grad()
            (nn.functional.cross_entropy(model(x.to(dtype)), y) * bad.get(i, 1.0)).backward()
            opt.step()
        report = handle.report()
    return model, report, plasticity_warnings(caught)


@pytest.mark.parametrize("name", list(RULES))
def test_nonfinite_steps_are_undone_counted_and_warned_about_once(name):
    rule, dtype = RULES[name]
    bad = BAD if dtype is torch.float32 else {2: BAD[2], 6: BAD[6]}  # NaN: any dtype
    model, report, said = train(rule, dtype, bad)
    assert report.skipped_steps == len(bad) and len(said) == 1, said
    assert "NaN/Inf" in said[0] and "skipped_steps" in said[0]
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert all(math.isfinite(v) for v in (report.m1, report.m1_min, report.m_alpha))
    # the run equals one in which those batches never stepped
    expected_model, expected, none = train(rule, dtype, {}, leave_out=bad)
    assert none == [] and expected.skipped_steps == 0
    for p, q in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(p, q)
    assert (report.m1, report.m0, report.steps) == (expected.m1, expected.m0, expected.steps)
    assert report.m1_min == pytest.approx(expected.m1_min, rel=1e-12)


@pytest.mark.parametrize("how", ["no_grad", "load_state_dict"])
def test_nan_written_into_the_weights_is_reported_once_and_never_reaches_the_totals(how):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(synapses=0.5))
    data = batches(8)

    def step(i):
        x, y = data[i]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step(0)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = {k: v.clone() for k, v in good.items()}
    poisoned["0.weight"][1, 2] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "no_grad":
            with torch.no_grad():
                model[0].weight.copy_(poisoned["0.weight"])
        else:
            model.load_state_dict(poisoned)
        for i in (1, 2, 3):
            step(i)
        middle = handle.report()
        model.load_state_dict(good)  # repaired: learning goes on from here
        step(4)
        end = handle.report()
    said = plasticity_warnings(caught)
    assert len(said) == 1 and "['0.weight'] held NaN/Inf before the step" in said[0], said
    assert middle.skipped_steps == 3 and middle.steps == 1
    assert all(math.isfinite(v) for v in (middle.m1, middle.m1_min, end.m1, end.m1_min))
    assert end.steps == 2 and end.m1 > middle.m1


def test_an_overflow_only_in_the_float64_sum_is_skipped_too():
    """Finite float64 updates whose sum overflows would make M1 inf: not counted."""
    model = nn.Linear(2, 2).double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = attach(model, opt, Plasticity())
    model.weight.grad = torch.full((2, 2), -1.7e308, dtype=torch.float64)
    model.bias.grad = torch.zeros(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    report = handle.report()
    assert report.skipped_steps == 1 and report.m1 == 0.0 and torch.isfinite(model.weight).all()


def scaled_run(scale_bad: float, watch: bool, gate: bool = False):
    """Plain torch with a CPU GradScaler; batches 1 and 2 overflow at this loss scale."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(synapses=0.5, samples="lazy" if gate else None))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    if watch:
        handle.watch(scaler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches(8)):
            if gate:
                handle.gate_batch(y if i != 4 else model(x).argmax(1).detach())  # 4: all right
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) * (scale_bad if i in (1, 2) else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model, handle.report(), scaler, plasticity_warnings(caught)


@pytest.mark.parametrize("gate", [False, True])
def test_grad_scaler_skips_cost_nothing_and_count_as_skipped(gate):
    model, report, scaler, said = scaled_run(1e35, watch=True, gate=gate)
    assert scaler.get_scale() == 2.0**14  # the scaler skipped two steps
    assert report.skipped_steps == 2 and said == []
    assert report.steps == 8 - 2 - (1 if gate else 0)  # a gate-skipped step is no scaler skip
    # the same as a run in which those two batches were never there
    ref_model, ref, _, _ = scaled_run(0.0, watch=True, gate=gate)
    assert ref.skipped_steps == 0
    assert (report.m1, report.m0) == pytest.approx((ref.m1, ref.m0), rel=1e-6)


def test_without_watch_a_scaler_skip_is_invisible_and_watch_undoes_cleanly():
    _, report, _, _ = scaled_run(1e35, watch=False)
    assert report.skipped_steps == 0 and report.steps == 6
    scaler = torch.amp.GradScaler("cpu")
    model = mlp()
    handle = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), Plasticity())
    handle.watch(scaler)
    assert "step" in scaler.__dict__
    handle.detach()
    assert "step" not in scaler.__dict__


def test_lightning_16_mixed_counts_the_scalers_skips_and_logs_them():
    bad = {1: 1e35, 2: 1e35, 5: 1e35}
    callback = PlasticityCallback(synapses=0.5)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(max_epochs=1, callbacks=[callback], plugins=[plugin])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Tiny(bad), loader(batches(8)))
    report = callback.report()
    assert report.skipped_steps == 3 and report.steps == 5
    assert float(t.callback_metrics["plasticity/skipped_steps"]) == 3
    assert plasticity_warnings(caught) == []
    assert "step" not in plugin.scaler.__dict__  # teardown took the watch off


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_nan_losses_are_skipped_warned_once_and_logged(precision):
    bad = {1: float("nan"), 3: float("inf"), 4: float("nan")}
    callback = PlasticityCallback(synapses=0.5)
    t = trainer(max_epochs=1, callbacks=[callback], precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Tiny(bad), loader(batches(8)))
    report = callback.report()
    assert report.skipped_steps == 3 and report.steps == 5
    assert float(t.callback_metrics["plasticity/skipped_steps"]) == 3
    assert len(plasticity_warnings(caught)) == 1
    assert all(math.isfinite(v) for v in (report.m1, report.m1_min))


def test_a_nan_in_adams_moments_stalls_learning_but_never_the_weights_and_says_why():
    """Adam took the NaN gradient into its moments: every later update is NaN too. The
    weights stay finite and one warning names the cause and the fix."""
    callback = PlasticityCallback()
    t = trainer(max_epochs=1, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Tiny({2: float("nan")}, optimizer="adam"), loader(batches(8)))
    report = callback.report()
    assert report.steps == 2 and report.skipped_steps == 6
    said = plasticity_warnings(caught)
    assert len(said) == 1 and "Adam moments" in said[0] and "GradScaler" in said[0]
    assert all(torch.isfinite(p).all() for p in t.lightning_module.parameters())


def test_lightning_16_mixed_with_a_gate_survives_a_batch_nobody_learns_from():
    """The scaler needs gradients: an all-correct batch still runs its backward pass
    (into zeros), and its step is skipped by the gate, not counted as a scaler skip."""
    data = batches(6)
    with torch.no_grad():
        data[0] = (data[0][0], mlp()(data[0][0]).argmax(1))  # the initial model is right
    callback = PlasticityCallback(samples="lazy")
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(max_epochs=1, callbacks=[callback], plugins=[plugin])
    t.fit(Tiny({3: 1e35}), loader(data))
    report = callback.report()
    assert report.skipped_steps == 1 and report.steps == 4
    assert report.samples_learned < report.samples_seen == 48
