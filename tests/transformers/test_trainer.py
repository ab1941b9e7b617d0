"""The Trainer callback against the NumPy oracle and an independent witness: masks and
energy exact under the Trainer's AdamW (weight decay, schedule), gradient clipping and
accumulation; the sample gate on sequence classification and on a causal LM."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hf_models import Sequences, Witness, tiny_bert, tiny_gpt2, trainer, transformers
from oracle_replay import oracle_step

from energy_callbacks import FixedSubnetwork, Plasticity, Topology
from energy_callbacks.torch import describe
from energy_callbacks.transformers import PlasticityCallback

EXACT = dict(gradient_accumulation_steps=4, max_grad_norm=0.5, weight_decay=0.01, max_steps=5)


class Oracle(transformers.TrainerCallback):
    """Masks each step of the Trainer's optimizer by the NumPy core (oracle_step)."""

    def __init__(self, rule: dict, topology=None):
        self.rule, self.topology = rule, topology

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        specs, params = describe(model)
        self.oracle = Plasticity(**self.rule).setup(self.topology or Topology.chain(specs))
        inner = optimizer.optimizer
        step = inner.step
        inner.step = lambda closure=None: oracle_step(self.oracle, params, step)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a, b):
    for n in a:
        assert torch.equal(a[n], b[n]), n


HEAD = ("bert.pooler.dense", "classifier")


def head_only(model):
    """Fine-tune the head: the pooler (hidden units) and the classifier (outputs)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(HEAD))
    return model


@pytest.mark.parametrize(
    "rule, make",
    [
        ({"synapses": 0.1}, tiny_bert),
        ({"units": 0.5}, tiny_bert),
        ({"units": FixedSubnetwork(8)}, lambda: head_only(tiny_bert())),
    ],
    ids=["top-fraction", "top-units", "fixed-subnetwork-head"],
)
def test_masks_and_energy_match_the_oracle_and_the_witness(tmp_path, rule, make):
    callback = PlasticityCallback(**rule)
    witness = Witness()
    model = make()
    trainer(model, tmp_path / "a", [callback, witness], **EXACT).train()
    report = callback.report()
    assert report.steps == 5
    assert report.m0 == witness.m0 > 0
    assert report.m1 == pytest.approx(witness.m1, rel=1e-12)
    for step in witness.steps:  # the rule restricted every step
        changed = sum(c for c, _ in step.values())
        assert 0 < changed < 0.6 * sum(n for _, n in step.values())

    # the same run with the optimizer's steps masked by the NumPy core, wired as the
    # adapter read the wiring off the forward pass
    twin = make()
    topology = callback.plasticity.topology if "units" in rule else None
    oracle = Oracle(copy.deepcopy(rule), topology)
    trainer(twin, tmp_path / "b", [oracle], **EXACT).train()
    assert_same_weights(weights(model), weights(twin))
    want = oracle.oracle.report()
    assert report.m0 == want.m0
    assert report.m1 == pytest.approx(want.m1, rel=1e-12)
    # the oracle sums float64 steps, the adapter reads w_T - w_0: rounding of sums only
    assert report.m1_min == pytest.approx(want.m1_min, rel=1e-9)


def test_the_top_fraction_keeps_its_exact_count_in_every_tensor_at_every_step(tmp_path):
    witness = Witness()
    model = tiny_bert()
    trainer(model, tmp_path, [PlasticityCallback(synapses=0.1), witness], **EXACT).train()
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    for step in witness.steps:
        for name, (changed, _) in step.items():
            # at most k; fewer where entries had no proposal (no gradient, no decay)
            assert changed <= math.ceil(0.1 * sizes[name]), name
        assert sum(c for c, _ in step.values()) > 0


def _mistakes_step(model, batch, lr, shift):
    """One SGD step on the loss of the mistakes only, with the loss's own normalization:
    the mean over the batch, or for the LM the Trainer's token count (``num_items_in_batch``:
    the labels that are not -100, unshifted for a model without a ``loss_type``)."""
    out = model(input_ids=batch["input_ids"])
    logits, labels = out.logits, batch["labels"]
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    valid = labels != -100
    wrong = (logits.argmax(-1) != labels) & valid
    losses = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    norm = (batch["labels"] != -100).sum() if shift else valid.sum()
    loss = (losses * wrong).sum() / norm
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return int(wrong.sum()), int(valid.sum())


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_the_gate_acts_on_the_gradient_of_the_models_own_loss(tmp_path, task):
    """One Trainer step with the lazy gate equals an SGD step on the mistakes' loss."""
    make = (lambda: tiny_bert(dropout=0.0)) if task == "classify" else tiny_gpt2
    data = Sequences(n=8, task=task)
    callback = PlasticityCallback(samples="lazy")
    model = make()
    run = trainer(
        model,
        tmp_path,
        [callback],
        data=data,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    run.train()
    twin = make()
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    batch_order = list(run.get_train_dataloader().sampler)  # the Trainer's shuffled order
    batch = {k: v[batch_order] for k, v in batch.items()}
    wrong, valid = _mistakes_step(twin, batch, 0.5, shift=task == "lm")
    assert 0 < wrong < valid  # some samples (tokens) learn, some do not
    report = callback.report()
    assert (report.samples_learned, report.samples_seen) == (wrong, valid)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_lazy_gating_with_accumulation_matches_the_witness(tmp_path, task):
    make = tiny_bert if task == "classify" else tiny_gpt2
    callback = PlasticityCallback(synapses=0.1, samples="lazy")
    witness = Witness()
    run = trainer(make(), tmp_path, [callback, witness], data=Sequences(task=task), **EXACT)
    run.train()
    report = callback.report()
    assert report.m0 == witness.m0 > 0
    assert report.m1 == pytest.approx(witness.m1, rel=1e-12)
    assert 0 < report.samples_learned < report.samples_seen
    tokens = 1 if task == "classify" else Sequences().x.shape[1] - 4 - 1  # valid shifted labels
    assert report.samples_seen == 5 * 4 * 8 * tokens


def test_energy_reaches_the_logs_and_log_history_at_every_logging_step(tmp_path):
    callback = PlasticityCallback(synapses=0.1)
    witness = Witness()
    run = trainer(tiny_bert(), tmp_path, [callback, witness], max_steps=6, logging_steps=2)
    run.train()
    logged = [r for r in run.state.log_history if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    m0 = np.cumsum([sum(c for c, _ in s.values()) for s in witness.steps])
    for record in logged:
        assert record["plasticity/updates"] == int(m0[record["step"] - 1])
        assert isinstance(record["plasticity/updates"], int)  # exact, not a float32
        assert record["plasticity/energy"] > 0
        assert record["plasticity/inefficiency"] >= 1.0 - 1e-9  # M1 >= M1_min
    assert logged[-1]["plasticity/energy"] == pytest.approx(witness.m1, rel=1e-12)


class TokenLabels(Sequences):
    """Token classification: a class per token (id mod 5), the last 3 tokens -100."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        labels = self.x[i] % 5
        labels[-3:] = -100
        item["labels"] = labels
        return item


class MaskedTokens(Sequences):
    """Masked LM labels: every third token is predicted, the others are -100."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        labels = torch.full_like(self.x[i], -100)
        labels[::3] = self.x[i][::3]
        item["labels"] = labels
        return item


def _bert_with(head, **config):
    torch.manual_seed(0)
    base = tiny_bert().config.to_dict()
    base.update(config)
    return head(transformers.BertConfig(**base))


@pytest.mark.parametrize(
    "name",
    ["token-classification", "masked-lm-mistakes", "checkpointing-bf16-adafactor"],
)
def test_real_trainer_configurations_match_the_witness(tmp_path, name):
    options: dict = {}
    if name == "token-classification":
        model = _bert_with(transformers.BertForTokenClassification, num_labels=5)
        rule, data = {"synapses": 0.1, "samples": "lazy"}, TokenLabels()
        tokens = 8 * 4 * (TokenLabels().x.shape[1] - 3)
    elif name == "masked-lm-mistakes":
        model = _bert_with(transformers.BertForMaskedLM)
        rule, data = {"samples": "mistakes"}, MaskedTokens(ids=True)
        options = {"remove_unused_columns": False}
        tokens = 8 * 4 * len(range(0, MaskedTokens().x.shape[1], 3))
    else:
        model = tiny_bert()
        rule, data = {"synapses": 0.1, "units": 0.5}, Sequences()
        options = {"gradient_checkpointing": True, "bf16": True, "optim": "adafactor"}
        tokens = 8 * 4
    callback, witness = PlasticityCallback(**rule), Witness()
    trainer(model, tmp_path, [callback, witness], data=data, max_steps=4, **options).train()
    report = callback.report()
    assert report.m0 == witness.m0 > 0
    assert report.m1 == pytest.approx(witness.m1, rel=1e-12)
    assert report.samples_seen == tokens  # one decision per labelled token (or sample)
    if name == "token-classification":  # a learnable task: some tokens are right already
        assert 0 < report.samples_learned < report.samples_seen
