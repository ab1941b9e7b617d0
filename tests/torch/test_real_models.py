"""The torch adapter on real models, where a rule could silently do nothing: custom
outputs, odd targets, token-level outputs, recurrent and attention layers, layers
registered out of order, residual wiring, parameters that join mid-run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from energy_callbacks import MemorizedMistakes, Plasticity, TopFraction, TopUnits
from energy_callbacks.core import keep_count
from energy_callbacks.torch import attach


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# -- 1. the gate acts on what the loss uses -------------------------------------
class Scored(nn.Module):
    """Returns a dict; the loss uses "logits", the gate is told to judge a derived view."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return {"logits": self.body(x), "features": x.sum(1)}


def test_a_derived_outputs_tensor_still_gates_the_loss_gradient():
    model, twin = Scored(), Scored()
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(
        model, opt, Plasticity(samples="lazy"), outputs=lambda out: out["logits"].float() * 2
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    handle.gate_batch(y)
    nn.functional.cross_entropy(model(x)["logits"], y).backward()
    wrong = twin(x)["logits"].argmax(1) != y
    assert 0 < int(wrong.sum()) < 16
    per_sample = nn.functional.cross_entropy(twin(x)["logits"], y, reduction="none")
    (per_sample * wrong).sum().div(16).backward()
    for a, b in zip(grads(model), grads(twin)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    opt.step()  # the gradient reached the output: no complaint
    assert handle.report().samples_learned == int(wrong.sum())


def test_a_loss_that_bypasses_the_forward_output_is_an_error_not_ungated_training():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    x, y = torch.randn(16, 6), (torch.arange(16) % 3)
    handle.gate_batch(y)
    model(x)  # gated, but the loss below recomputes the logits without the module call
    nn.functional.cross_entropy(model[2](model[1](model[0](x))), y).backward()
    with pytest.raises(RuntimeError, match="no gradient reached"):
        opt.step()


# -- 2. targets the gates cannot judge ---------------------------------------------
@pytest.mark.parametrize(
    ("out_features", "targets", "match"),
    [
        (1, torch.randn(8, 1), "samples=None"),  # regression
        (1, torch.randint(0, 2, (8,)), "torch.cat"),  # one binary logit
        (3, torch.randn(8, 3), "not a probability row"),  # 3 regression targets
    ],
)
def test_regression_and_single_logit_targets_are_refused_with_the_fix(out_features, targets, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, out_features))
    handle = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), Plasticity(samples="lazy"))
    handle.gate_batch(targets)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(8, 6))


def test_a_single_logit_gates_through_two_class_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(
        model, opt, Plasticity(samples="lazy"), outputs=lambda z: torch.cat([-z, z], -1)
    )
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    handle.gate_batch(y)
    z = model(x)
    nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float()).backward()
    wrong = (z[:, 0] > 0).long() != y
    assert handle.report().samples_learned == int(wrong.sum()) < 32


# -- 3. token-level outputs ------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))  # (batch, tokens, vocab)


def test_token_outputs_gate_per_token_and_ignored_tokens_never_count():
    model, twin = TinyLM(), TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (4, 7), generator=g)
    targets = torch.randint(0, 11, (4, 7), generator=g)
    targets[:, -2:] = -100  # padding
    handle.gate_batch(targets)
    logits = model(tokens)
    nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)).backward()
    # The same loss with only the wrong (non-padding) tokens' terms, same normalization.
    ref = twin(tokens)
    counted = targets != -100
    wrong = (ref.argmax(-1) != targets) & counted
    assert 0 < int(wrong.sum()) < int(counted.sum())
    terms = nn.functional.cross_entropy(
        ref.reshape(-1, 11), targets.reshape(-1), reduction="none"
    ).reshape(4, 7)
    (terms * wrong).sum().div(counted.sum()).backward()
    for a, b in zip(grads(model), grads(twin)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    report = handle.report()
    assert (report.samples_seen, report.samples_learned) == (int(counted.sum()), int(wrong.sum()))


def test_token_memory_flags_a_sequence_by_its_id():
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = MemorizedMistakes()
    handle = attach(model, opt, Plasticity(samples=gate))
    tokens = torch.randint(0, 11, (3, 5))
    handle.gate_batch(torch.randint(0, 11, (3, 5)), torch.tensor([7, 8, 9]))
    model(tokens)
    assert set(gate.memory.flagged().tolist()) <= {7, 8, 9} and gate.memory.count() > 0


# -- 5. unit rules on recurrent and attention layers; wiring from the forward pass ----
class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(5, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def step(model, opt, x, y):
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    opt.step()
    return {n: (p != b) for (n, p), b in zip(model.named_parameters(), before)}


def test_lstm_units_are_gate_rows_and_the_head_keeps_all_its_units():
    model = Recurrent()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    attach(model, opt, Plasticity(units=TopUnits(k=5)))
    changed = step(model, opt, torch.randn(6, 4, 5), torch.randint(0, 3, (6,)))
    rows = changed["rnn.weight_ih_l0"].any(1)
    assert int(rows.sum()) == 5  # 5 of the 32 gate rows
    for name in ("rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        assert not (changed[name].reshape(32, -1).any(1) & ~rows).any(), name
    assert changed["head.weight"].all(1).sum() == 3  # the output layer: every unit


def test_a_path_through_an_lstm_is_refused():
    model = Recurrent()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    attach(model, opt, Plasticity(units=TopUnits(k=5, path=True)))
    with pytest.raises(ValueError, match="gate rows"):
        step(model, opt, torch.randn(6, 4, 5), torch.randint(0, 3, (6,)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.norm(h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


def test_attention_projections_are_units_and_a_residual_path_is_refused():
    model = Attention()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(units=TopUnits(0.25)))
    changed = step(model, opt, torch.randn(5, 6, 4), torch.randint(0, 3, (5,)))
    topology = handle.plasticity.topology
    assert {layer.name for layer in topology.hidden} == {"proj", "attn.in_proj", "attn.out_proj"}
    assert topology.outputs == ("head",)
    assert int(changed["attn.in_proj_weight"].any(1).sum()) == keep_count(0.25, 24)
    assert int(changed["proj.weight"].any(1).sum()) == keep_count(0.25, 8)
    assert changed["norm.weight"].all()  # no unit axis: the unit rule leaves it alone

    model = Attention()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    attach(model, opt, Plasticity(units=TopUnits(0.25, path=True)))
    with pytest.raises(ValueError, match=r"cannot prove how layer .* feeds .*attention"):
        step(model, opt, torch.randn(5, 6, 4), torch.randint(0, 3, (5,)))


class Reversed(nn.Module):
    """The head is registered first: registration order would call it hidden."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(10, 3)
        self.body = nn.Linear(6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_hidden_and_output_layers_come_from_the_forward_pass_not_registration_order():
    model = Reversed()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(units=TopUnits(k=2, path=True)))
    changed = step(model, opt, torch.randn(8, 6), torch.randint(0, 3, (8,)))
    topology = handle.plasticity.topology
    assert [layer.name for layer in topology.hidden] == ["body"]
    assert topology.outputs == ("head",) and topology.edges == (("body", "head"),)
    body_units = changed["body.bias"]
    assert int(body_units.sum()) == 2
    assert not changed["head.weight"][:, ~body_units].any()  # the path: selected inputs only


def rule() -> Plasticity:
    return Plasticity(units=TopUnits(0.5, path=True))


def test_adjacency_states_the_wiring_and_skips_the_proof():
    model = Attention()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    links = [("proj", "attn.in_proj"), ("attn.out_proj", "head")]  # in_proj: 24 units, 8 out
    handle = attach(model, opt, Plasticity(units=TopUnits(0.5, path=True)), adjacency=links)
    step(model, opt, torch.randn(5, 6, 4), torch.randint(0, 3, (5,)))
    topology = handle.plasticity.topology
    assert topology.edges == tuple(links)
    assert set(topology.outputs) == {"attn.in_proj", "head"}  # no outgoing link: an output
    other = Attention()
    wrong = [("attn.in_proj", "attn.out_proj")]
    with pytest.raises(ValueError, match="24 units but layer 'attn.out_proj' takes 8"):
        attach(other, torch.optim.SGD(other.parameters(), lr=0.1), rule(), adjacency=wrong)


def test_a_model_with_one_trainable_layer_has_no_units_to_rank():
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    attach(model, opt, Plasticity(units=TopUnits(0.5)))
    with pytest.raises(ValueError, match="are all outputs"):
        step(model, opt, torch.randn(4, 6), torch.randint(0, 3, (4,)))


# -- 4. parameters that join mid-run -------------------------------------------------
def test_a_param_group_added_mid_run_is_masked_and_measured():
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    handle = attach(model, opt, Plasticity(synapses=TopFraction(0.25)))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    step(model, opt, x, y)
    first = handle.report()
    assert set(first.per_layer) == {"2.weight", "2.bias"}
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.5})
    before = [p.detach().clone() for p in model.parameters()]
    changed = step(model, opt, x, y)
    report = handle.report()
    assert set(report.per_layer) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert int(changed["0.weight"].sum()) == keep_count(0.25, 60)
    real = sum(
        (p.detach() - b).double().abs().sum().item() for p, b in zip(model.parameters(), before)
    )
    assert report.m1 == pytest.approx(first.m1 + real, rel=1e-9)
    assert report.per_layer["2.weight"].m1 > first.per_layer["2.weight"].m1


def test_a_checkpoint_taken_after_layers_joined_resumes_with_them_frozen_again():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(synapses=0.5))
    step(model, opt, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    state, report = handle.state_dict(), handle.report()
    # A fresh run: the first layer is frozen at the start, as fine-tuning callbacks do.
    resumed = mlp()
    resumed.load_state_dict(model.state_dict())
    resumed[0].requires_grad_(False)
    again = attach(
        resumed, torch.optim.SGD(resumed[2].parameters(), lr=0.5), Plasticity(synapses=0.5)
    )
    again.load_state_dict(state)
    got = again.report()
    assert set(got.per_layer) == set(report.per_layer)
    assert got.m1 == report.m1 and got.m0 == report.m0 and got.m1_min == report.m1_min
    with pytest.raises(ValueError, match="does not have"):
        other = nn.Sequential(nn.Linear(6, 3))
        attach(other, torch.optim.SGD(other.parameters(), lr=0.1)).load_state_dict(state)


def test_units_wait_for_frozen_hidden_layers_and_act_once_they_join():
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(units=TopUnits(k=3)))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.warns(RuntimeWarning, match="frozen"):
        step(model, opt, x, y)
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters())})
    changed = step(model, opt, x, y)
    assert [layer.name for layer in handle.plasticity.topology.hidden] == ["0"]
    assert int(changed["0.bias"].sum()) == 3  # the unit rule now ranks the joined layer


def test_a_replaced_layer_is_an_error_that_says_what_to_do():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    attach(model, opt, Plasticity())
    step(model, opt, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    model[2] = nn.Linear(10, 3)
    opt.add_param_group({"params": list(model[2].parameters())})
    with pytest.raises(RuntimeError, match="left the model"):
        step(model, opt, torch.randn(4, 6), torch.randint(0, 3, (4,)))


# -- 8. configuration ------------------------------------------------------------
def test_one_layer_name_is_a_list_of_one_and_adjacency_comes_as_lists():
    model = nn.Sequential()
    model.add_module("net", mlp())
    handle = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), layers="net")
    assert [s.name for s in handle.specs][:2] == ["net.0.weight", "net.0.bias"]
    with pytest.raises(ValueError, match="module name"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), layers=[0])
    with pytest.raises(ValueError, match="pre, post"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), adjacency=[["net.0"]])


def test_schedulers_before_or_after_the_gate_see_a_normal_step(recwarn):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    early = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    late = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
    x = torch.randn(8, 6)
    for y in (model(x).argmax(1), (model(x).argmax(1) + 1) % 3):  # skipped, then a real step
        handle.gate_batch(y)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        early.step()
        late.step()
    messages = [str(w.message) for w in recwarn.list]
    assert not [m for m in messages if "lr_scheduler" in m or "optimizer.step()" in m], messages
    assert handle.report().steps == 1


def test_a_closure_that_returns_none_skips_the_batch():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(model, opt, Plasticity(samples="lazy"))
    handle.gate_batch(torch.zeros(4, dtype=torch.long))
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step(lambda: None) is None
    assert not handle.gate.armed and all(
        torch.equal(p, b) for p, b in zip(model.parameters(), before)
    )


@pytest.mark.parametrize("rule", [{}, {"synapses": 0.3}, {"units": TopUnits(0.5), "synapses": 0.3}])
def test_wiring_and_gating_survive_torch_compile(rule):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        run = torch.compile(model, backend="eager") if compiled else model
        with pytest.warns(RuntimeWarning, match="dynamo") if compiled else _nothing():
            handle = attach(run, opt, Plasticity(samples="lazy", **rule))
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            handle.gate_batch(y)
            opt.zero_grad()
            nn.functional.cross_entropy(run(x), y).backward()
            opt.step()
        results.append(
            (
                np.concatenate([p.detach().numpy().ravel() for p in model.parameters()]),
                handle.report(),
            )
        )
    (w0, r0), (w1, r1) = results
    np.testing.assert_array_equal(w0, w1)
    assert r0.m1 == r1.m1 and r0.samples_learned == r1.samples_learned


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_path_runs_through_batch_norm_pooling_dropout_and_a_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 3 * 3, 6), nn.GELU(), nn.Linear(6, 3),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(units=TopUnits(k=2, path=True)))
    step(model, opt, torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,)))
    topology = handle.plasticity.topology
    assert topology.edges == (("0", "6"), ("6", "8")) and topology.spreads == (("0", "6", 9),)
    assert [layer.name for layer in topology.hidden] == ["0", "6"]


class TiedLM(nn.Module):
    """A language model whose output head shares the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.emb(tokens))))


def test_a_weight_tied_to_the_output_head_is_an_embedding_to_unit_rules():
    """Documented: the tied tensor is described once, as the embedding (units = its
    dimensions, axis 1), so a unit rule picks embedding dimensions, not output rows."""
    from energy_callbacks.torch import describe

    model = TiedLM()
    specs = {s.name: s for s in describe(model)[0]}
    assert "head.weight" not in specs
    assert (specs["emb.weight"].unit_axis, specs["emb.weight"].layer) == (1, "emb")
    assert specs["head.bias"].layer is None  # stands alone: the head is no layer
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = attach(model, opt, Plasticity(units=TopUnits(0.5)))
    before = model.emb.weight.detach().clone()
    tokens = torch.randint(0, 11, (16, 5))
    logits = model(tokens[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    changed_columns = (model.emb.weight.detach() != before).any(0)
    assert int(changed_columns.sum()) == 2  # 2 of the 4 embedding dimensions learned
    handle.detach()
