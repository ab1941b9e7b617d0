"""Plain PyTorch: attach() gates the real update of any optimizer, exactly like the oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from oracle_replay import oracle_step
from torch import nn

from energy_callbacks import Plasticity, TopFraction, TopUnits
from energy_callbacks.core import keep_count
from energy_callbacks.torch import attach, describe
from energy_callbacks.torch.ops import TorchOps

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=3),
    "param-groups": lambda ps: torch.optim.Adam(
        [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 1e-3}]
    ),
}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def batches(n: int = 12, size: int = 8):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(size, 12, generator=g)
        yield x, (x[:, :5] * 3).argmax(1)


def loss_closure(model, opt, x, y):
    """The closure every optimizer accepts (LBFGS needs one)."""

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def rule() -> Plasticity:
    return Plasticity(units=TopUnits(0.5, path=True), synapses=TopFraction(0.3))


def run_attached(make_opt):
    model = mlp()
    opt = make_opt(list(model.parameters()))
    handle = attach(model, opt, rule())
    for x, y in batches():
        opt.step(loss_closure(model, opt, x, y))
    return model, handle.report()


def run_by_hand(make_opt):
    """Same optimizer; the NumPy oracle masks the real proposal; put back what it drops."""
    model = mlp()
    params = list(model.parameters())
    opt = make_opt(params)
    specs, _ = describe(model)
    oracle = rule().setup(specs)
    for x, y in batches():
        closure = loss_closure(model, opt, x, y)
        oracle_step(oracle, params, lambda closure=closure: opt.step(closure))
    return model, oracle.report()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_any_optimizer_gets_exactly_the_oracle_masks(name):
    model, got = run_attached(OPTIMIZERS[name])
    twin, want = run_by_hand(OPTIMIZERS[name])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert got.steps == want.steps == 12
    assert got.m0 == want.m0 and got.m0_min == want.m0_min
    assert got.m1 == pytest.approx(want.m1, rel=1e-12)
    # The adapter folds w_T - w_0 exactly; the replay sums float32 deltas, which round
    # when a step moves a weight by more than its own size (LBFGS).
    assert got.m1_min == pytest.approx(want.m1_min, rel=1e-6)
    # The rule restricted: at most k = round(0.3 n) entries per tensor and step.
    assert got.m0 <= sum(keep_count(0.3, p.numel()) for p in model.parameters()) * got.steps


def test_two_optimizers_each_step_their_own_tensors():
    model = mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opts = [torch.optim.SGD(first, lr=0.1), torch.optim.Adam(second, lr=1e-2)]
    handle = attach(model, opts, Plasticity(synapses=0.25))
    moved = {n: 0.0 for n, _ in model.named_parameters()}
    for x, y in batches(4):
        for opt in opts:
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for opt in opts:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            for n, p in model.named_parameters():
                changed = (p.detach() != before[n]).sum().item()
                assert changed <= max(1, round(0.25 * p.numel()))
                moved[n] += (p.detach() - before[n]).abs().double().sum().item()
    report = handle.report()
    assert report.steps == 8  # one plasticity step per optimizer step
    for name, energy in moved.items():
        assert report.per_layer[name].m1 == pytest.approx(energy, rel=1e-9)


def test_skipped_amp_step_costs_nothing():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(synapses=0.5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(batches(1))
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)  # inf gradients: the scaler skips optimizer.step
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    report = handle.report()
    assert report.steps == 0 and report.m1 == 0.0 and report.m0 == 0


def test_nonfinite_update_is_undone_and_not_counted():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity())
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(batches(1))
    (nn.functional.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert handle.report().skipped_steps == 1 and handle.report().m1 == 0.0


def _sgd_step(model, opt, x, y) -> float:
    """One step; returns its sum |dw| (differences in the weights' dtype, as measured)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return _moved(model, before)


def _moved(model, before) -> float:
    return sum(
        (p.detach() - b).double().abs().sum().item() for p, b in zip(model.parameters(), before)
    )


@pytest.mark.parametrize("rules", [dict(), dict(synapses=0.3)])
def test_changes_between_steps_are_not_counted_when_torch_sees_them(rules):
    """The snapshot is carried from step to step (no copy), but a parameter written
    between steps (load_state_dict, an in-place op under no_grad, new storage) is
    copied afresh, so the next step counts only its own update."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(**rules))
    data = list(batches(5))
    real = _sgd_step(model, opt, *data[0])
    model.load_state_dict(mlp(seed=3).state_dict())
    real += _sgd_step(model, opt, *data[1])
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    real += _sgd_step(model, opt, *data[2])
    model[2].bias.data = model[2].bias.data.clone() + 1.0  # new storage
    real += _sgd_step(model, opt, *data[3])
    report = handle.report()
    assert report.steps == 4 and report.m1 == pytest.approx(real, rel=1e-12)


def test_changes_torch_does_not_see_land_in_the_next_step():
    """Writes through ``p.data`` bump no version counter: the documented limit is that
    they are measured as part of the next step's update (tracking only)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity())
    x, y = next(batches(1))
    real = _sgd_step(model, opt, x, y)
    start = [p.detach().clone() for p in model.parameters()]
    model[0].bias.data.add_(0.25)  # unseen by torch's version counter
    _sgd_step(model, opt, x, y)
    real += _moved(model, start)
    assert handle.report().m1 == pytest.approx(real, rel=1e-12)


@pytest.mark.parametrize("rules", [dict(), dict(synapses=0.3)])
def test_training_after_an_undone_step_counts_from_the_restored_weights(rules):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(**rules))
    data = list(batches(3))
    real = _sgd_step(model, opt, *data[0])
    x, y = data[1]
    opt.zero_grad()
    (nn.functional.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        opt.step()
    real += _sgd_step(model, opt, *data[2])
    report = handle.report()
    assert report.skipped_steps == 1 and report.steps == 2
    assert report.m1 == pytest.approx(real, rel=1e-12)


def test_detach_restores_the_optimizer():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = opt.step
    handle = attach(model, opt, Plasticity(synapses=0.1, samples="lazy"))
    assert opt.step is not step
    handle.detach()
    assert opt.step == step and "step" not in opt.__dict__
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_hooks


def test_attach_errors():
    model = mlp()
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="none of the model's trainable parameters"):
        attach(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="does not have"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=["nope"])
    handle = attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no sample gate"):
        handle.gate_batch(torch.zeros(3))


def test_layers_pick_modules_in_forward_order():
    model = mlp()
    specs, params = describe(model, layers=["2", "0"])
    assert [s.name for s in specs] == ["2.weight", "2.bias", "0.weight", "0.bias"]
    specs, _ = describe(model, layers=[""])  # the root: everything
    assert [s.layer for s in specs] == ["0", "0", "2", "2"]


def test_torch_ops_match_the_numpy_oracle():
    """The torch-native ops (used off-CPU and for bf16) select what NumPy selects."""
    from energy_callbacks.core import numpy_ops

    rng = np.random.default_rng(0)
    ops = TorchOps("cpu")
    for _ in range(30):
        rows, n = rng.integers(1, 5), rng.integers(1, 300)
        x = (rng.integers(0, 6, (rows, n)) * 0.25).astype(np.float32)  # many ties
        k = rng.integers(0, n + 1, rows)
        for largest in (True, False):
            want = numpy_ops.top_k_mask(x, k, largest)
            got = ops.top_k_mask(torch.from_numpy(x), torch.from_numpy(k), largest).numpy()
            np.testing.assert_array_equal(got, want)
    x = torch.randn(7, 4, 3)
    assert ops.total(x) == pytest.approx(numpy_ops.total(x.numpy()), rel=1e-12)
    assert ops.count_nonzero(x) == numpy_ops.count_nonzero(x.numpy())
    np.testing.assert_allclose(ops.row_l1(x, 1).numpy(), numpy_ops.row_l1(x.numpy(), 1))
    t16 = torch.tensor([0.0999755859375, 0.10009765625], dtype=torch.float16)
    assert ops.greater_equal(t16, 0.1).tolist() == [False, True]


def test_bf16_parameters_use_torch_ops():
    model = copy.deepcopy(mlp()).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(synapses=0.5))
    assert isinstance(handle.ops, TorchOps)
    x, y = next(batches(1))
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y).backward()
    opt.step()
    real = sum(
        (p.detach().double() - b.double()).abs().sum().item()
        for p, b in zip(model.parameters(), before)
    )
    report = handle.report()
    assert isinstance(report.m1, float) and report.m1 == pytest.approx(real, rel=1e-12)
    for p, b in zip(model.parameters(), before):
        assert (p != b).sum() <= keep_count(0.5, p.numel())


def test_float16_parameters_record_exact_differences():
    """16-bit weights: the difference is taken in float32, where it is exact."""
    model = mlp().to(torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity())
    before = [p.detach().double() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    real = sum(
        (p.detach().double() - b).abs().sum().item() for p, b in zip(model.parameters(), before)
    )
    assert handle.report().m1 == pytest.approx(real, rel=1e-12)


@pytest.mark.parametrize("rules", [dict(), dict(units=TopUnits(0.5, path=True), synapses=0.3)])
def test_fused_kernels_match_the_numpy_path(monkeypatch, rules):
    """numba's one-pass kernels give the NumPy path's weights and energy."""
    from energy_callbacks.core import fused

    assert fused.AVAILABLE  # numba is in the torch extra
    results = []
    for available in (True, False):
        monkeypatch.setattr(fused, "AVAILABLE", available)
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        handle = attach(model, opt, Plasticity(**copy.deepcopy(rules)))
        for x, y in batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results.append((list(model.parameters()), handle.report()))
    (w_fused, fused_report), (w_numpy, numpy_report) = results
    assert all(torch.equal(a, b) for a, b in zip(w_fused, w_numpy))
    assert fused_report.m0 == numpy_report.m0
    assert fused_report.m1 == pytest.approx(numpy_report.m1, rel=1e-12)


def test_conv_net_path_links_the_convolutions_and_the_flatten():
    """The path is read off the forward pass: conv -> relu -> conv -> flatten -> linear,
    each channel of the last conv feeding its block of 4 x 4 flattened inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(units=TopUnits(k=2, path=True)))
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(
        model(torch.randn(5, 1, 8, 8)), torch.tensor([0, 1, 2, 0, 1])
    ).backward()
    opt.step()
    topology = handle.plasticity.topology
    assert [layer.name for layer in topology.hidden] == ["0", "2"]
    assert topology.edges == (("0", "2"), ("2", "4")) and topology.spreads == (("2", "4", 16),)
    changed = [(p != b) for p, b in zip(model.parameters(), before)]
    conv1_units = changed[1]  # bias: the 2 selected units of conv 0
    conv2_units = changed[3]
    assert conv1_units.sum() == 2 and conv2_units.sum() == 2
    # conv 2's kernel changes only between selected units: out (axis 0) and in (axis 1).
    plastic = conv2_units[:, None, None, None] & conv1_units[None, :, None, None]
    assert not (changed[2] & ~plastic).any()
    # The dense output layer keeps all its units; its inputs are the selected channels' blocks.
    columns = conv2_units.repeat_interleave(16)
    assert not changed[4][:, ~columns].any() and changed[4][:, columns].float().mean() > 0.9


LAZY_RULES = {
    "approximate": lambda: Plasticity(synapses=TopFraction(0.1, approximate=True)),
    "exact": lambda: Plasticity(synapses=TopFraction(0.1)),
    "units then approximate": lambda: Plasticity(
        units=TopUnits(0.5), synapses=TopFraction(0.2, approximate=True)
    ),
}


@pytest.mark.parametrize("name", LAZY_RULES)
def test_fused_masked_steps_on_large_layers_match_the_numpy_path(monkeypatch, name):
    """Above 16384 entries the fused path selects from ``w - w_before`` without writing
    the difference out (the approximate rule applies its threshold in the same pass
    as the undo); weights, energy and NaN handling equal the NumPy path's."""
    from energy_callbacks.core import fused

    results = []
    for available in (True, False):
        monkeypatch.setattr(fused, "AVAILABLE", available)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 70), nn.Tanh(), nn.Linear(70, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # a NaN step leaves no state
        handle = attach(model, opt, LAZY_RULES[name]())
        g = torch.Generator().manual_seed(1)
        for step in range(8):
            x = torch.randn(16, 300, generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), (x[:, :5] * 3).argmax(1))
            (loss * (float("nan") if step == 4 else 1.0)).backward()
            if step == 4:
                with pytest.warns(RuntimeWarning, match="NaN/Inf"):
                    opt.step()
            else:
                opt.step()
        results.append(([p.detach().clone() for p in model.parameters()], handle.report()))
    (w_fused, fused_report), (w_numpy, numpy_report) = results
    assert all(torch.equal(a, b) for a, b in zip(w_fused, w_numpy))
    assert fused_report.skipped_steps == numpy_report.skipped_steps == 1
    assert fused_report.m0 == numpy_report.m0
    assert fused_report.m1 == pytest.approx(numpy_report.m1, rel=1e-12)


# -- sample gates and optimizers that re-evaluate their closure -------------------------
def test_lbfgs_with_a_sample_gate_is_refused_at_attach():
    model = mlp()
    opt = OPTIMIZERS["lbfgs"](list(model.parameters()))
    with pytest.raises(ValueError, match="LBFGS evaluates its closure several times"):
        attach(model, opt, Plasticity(samples="lazy"))
    assert not opt._optimizer_step_pre_hooks and not model._forward_hooks  # nothing left
    attach(model, opt, Plasticity(synapses=0.3)).detach()  # rules without a gate: fine


class TwiceSGD(torch.optim.SGD):
    """A closure optimizer torch does not ship: it evaluates the closure twice per step."""

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            closure()
            loss = closure()
        super().step()
        return loss


def test_an_unknown_optimizer_that_calls_its_closure_again_is_stopped_before_it_learns():
    model = mlp()
    opt = TwiceSGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    x, y = next(batches())
    before = [p.detach().clone() for p in model.parameters()]
    handle.gate_batch(y)
    with pytest.raises(RuntimeError, match="TwiceSGD evaluates its closure several times"):
        opt.step(loss_closure(model, opt, x, y))
    for p, b in zip(model.parameters(), before):  # the second, ungated pass never stepped
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)
    handle.detach()


def test_weight_decay_is_part_of_the_update_so_it_is_masked_and_counted():
    """Documented: AdamW's decay is in dw = w_after - w_before, so TopFraction(0.1) lets
    10% of the weights decay in a step, and the decay is counted in M1."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    handle = attach(model, opt, Plasticity(synapses=TopFraction(0.1)))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: the whole proposal is the decay
    opt.step()
    m1 = 0.0
    for p, b in zip(model.parameters(), before):
        changed = p.detach() != b
        assert int(changed.sum()) == keep_count(0.1, p.numel())
        decay = 0.1 * 0.5 * b.abs()  # AdamW: w -= lr * wd * w; the largest |dw| win
        assert (decay[changed].min() >= decay[~changed].max()).item()
        m1 += float((p.detach() - b).abs().sum())
    assert handle.report().m1 == pytest.approx(m1, rel=1e-6)
    handle.detach()
