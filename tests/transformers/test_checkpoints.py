"""Checkpoint and resume through the Trainer's own checkpoints, the energy in the
report_to integrations, and the refusals."""

from __future__ import annotations

import glob
import json
import struct

import pytest
import torch
from hf_models import Sequences, tiny_bert, tiny_gpt2, trainer, transformers

from energy_callbacks import Caching
from energy_callbacks.transformers import ARRAYS_FILE, PlasticityCallback

RESUME = dict(max_steps=8, save_strategy="steps", save_steps=4, remove_unused_columns=False)


@pytest.mark.parametrize(
    "rule",
    [
        {"synapses": 0.1, "samples": "mistakes"},
        {"caching": Caching(theta=0.001, tau=20, maintenance_cost=0.01)},
    ],
    ids=["mistakes", "caching"],
)
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, rule):
    data = Sequences(ids=True)
    whole = PlasticityCallback(**rule)
    model = tiny_bert(dropout=0.0)
    trainer(model, tmp_path / "whole", [whole], data=data, **RESUME).train()

    first = PlasticityCallback(**rule)
    trainer(tiny_bert(dropout=0.0), tmp_path / "cut", [first], data=data, **RESUME).train()
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert "PlasticityCallback" in saved["stateful_callbacks"]  # the Trainer's protocol
    assert (checkpoint / ARRAYS_FILE).is_file()  # w_0 and the memory: tensors, no pickle

    resumed = PlasticityCallback(**rule)
    again = tiny_bert(dropout=0.0, seed=1)  # other weights: the checkpoint's are loaded
    run = trainer(again, tmp_path / "cut", [resumed], data=data, **RESUME)
    run.train(resume_from_checkpoint=str(checkpoint))
    a, b = whole.report(), resumed.report()
    assert (b.steps, b.m0, b.m0_min) == (a.steps, a.m0, a.m0_min)
    assert (b.samples_seen, b.samples_learned) == (a.samples_seen, a.samples_learned)
    assert b.m1 == pytest.approx(a.m1, rel=1e-12)
    assert b.m1_min == pytest.approx(a.m1_min, rel=1e-12)
    assert b.energy == pytest.approx(a.energy, rel=1e-12)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    if "samples" in rule:
        memory = whole.plasticity.samples.memory.state_dict()
        again_memory = resumed.plasticity.samples.memory.state_dict()
        assert (memory["bits"] == again_memory["bits"]).all()


def test_a_second_train_call_carries_the_totals_on(tmp_path):
    callback = PlasticityCallback(synapses=0.1)
    run = trainer(tiny_bert(), tmp_path, [callback], max_steps=3)
    run.train()
    first = callback.report()
    run.train()
    assert callback.report().steps == first.steps + 3
    assert callback.report().m1 > first.m1


def _scalars(folder):
    """The scalar tags in the TensorBoard event files under ``folder``, read as
    TFRecords (length, crc, event, crc) without importing TensorFlow."""
    from tensorboard.compat.proto.event_pb2 import Event

    tags = set()
    for path in glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True):
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            (size,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + size])
            tags |= {v.tag for v in event.summary.value}
            at += 12 + size + 4
    return tags


def test_report_to_tensorboard_logs_the_energy_once_the_callback_goes_first(tmp_path):
    logs = tmp_path / "a"  # the TensorBoard callback writes under output_dir/runs
    callback = PlasticityCallback(synapses=0.1)
    run = trainer(tiny_bert(), logs, [callback], report_to="tensorboard")
    assert callback.log_before_reporters(run) is callback
    run.train()
    tags = _scalars(logs)
    assert {"train/plasticity/energy", "train/plasticity/updates"} <= tags
    history = [r for r in run.state.log_history if "loss" in r]
    assert all("plasticity/energy" in r for r in history)

    # without it the Trainer calls the integrations before the callback: they miss it
    late = tmp_path / "b"
    run = trainer(tiny_bert(), late, [PlasticityCallback(synapses=0.1)], report_to="tensorboard")
    run.train()
    assert "train/plasticity/energy" not in _scalars(late)
    assert "plasticity/energy" in run.state.log_history[0]  # log_history has it anyway


def test_a_model_without_labels_gets_the_refusal_message(tmp_path):
    run = trainer(
        tiny_bert(),
        tmp_path,
        [PlasticityCallback(samples="lazy")],
        data=Sequences(labels=False),
        max_steps=1,
        logging_steps=1,
    )
    with pytest.raises(ValueError, match="has no 'labels'.*targets="):
        run.train()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: transformers.BertModel(tiny_bert().config), "no head whose logits"),
        (lambda: tiny_bert(num_labels=1), "regression"),
    ],
    ids=["base-model", "regression"],
)
def test_models_the_gate_cannot_judge_are_refused_at_train_begin(tmp_path, make, match):
    run = trainer(make(), tmp_path, [PlasticityCallback(samples="lazy")], max_steps=1)
    with pytest.raises(ValueError, match=match):
        run.train()


def test_regression_trains_with_the_other_rules(tmp_path):
    class Scores(Sequences):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["labels"] = item["labels"].float()
            return item

    callback = PlasticityCallback(synapses=0.1)
    trainer(tiny_bert(num_labels=1), tmp_path, [callback], data=Scores(), max_steps=2).train()
    assert callback.report().steps == 2


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(restore_callback_states_from_checkpoint=True), "restore_callback_states"),
        (dict(remove_unused_columns=True), "remove_unused_columns=False"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
        (dict(torch_compile=True), "torch_compile=False"),
    ],
)
def test_arguments_it_cannot_be_exact_under_are_refused_when_the_trainer_is_built(
    tmp_path, options, match
):
    with pytest.raises(ValueError, match=match):
        trainer(tiny_bert(), tmp_path, [PlasticityCallback(samples="mistakes")], **options)


def test_the_causal_lm_gate_judges_the_next_token(tmp_path):
    """Labels shifted as the loss shifts them: a model that copies its input is always
    wrong on the next token, so every valid token learns."""
    callback = PlasticityCallback(samples="lazy")
    data = Sequences(task="lm", n=16)
    trainer(tiny_gpt2(), tmp_path, [callback], data=data, max_steps=2).train()
    report = callback.report()
    assert report.samples_seen == 2 * 8 * (data.x.shape[1] - data.pad - 1)


def test_a_train_that_failed_leaves_no_second_set_of_hooks(tmp_path):
    callback = PlasticityCallback(synapses=0.1, samples="lazy")
    model = tiny_bert()
    run = trainer(model, tmp_path, [callback], data=Sequences(labels=False), max_steps=2)
    with pytest.raises(ValueError, match="has no 'labels'"):
        run.train()
    run.train_dataset = Sequences()
    run.train()  # attaches once again: one pre-hook on the forward, one set on the step
    assert len(model._forward_pre_hooks) == 0  # detached at the end of training
    assert callback.report().steps == 2
