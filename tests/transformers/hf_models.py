"""Shared pieces for the Hugging Face Trainer tests (a module of its own name: the
Lightning tests own `conftest`): tiny models built from configs
(nothing is downloaded), small datasets, a Trainer factory and the witness."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

VOCAB = 120
SEQ = 16


def tiny_bert(num_labels: int = 3, dropout: float = 0.1, seed: int = 0):
    """A 2-layer BERT (hidden size 32) for sequence classification."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0, positions: int = SEQ):
    """A 2-layer GPT-2 (hidden size 32) causal language model, without dropout."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class Sequences(torch.utils.data.Dataset):
    """Random token ids. ``task="classify"``: a label from the first token (learnable);
    ``task="lm"``: the ids as labels, the last ``pad`` positions -100 (padding).
    ``ids=True`` adds a ``sample_id`` column; ``labels=False`` leaves labels out."""

    def __init__(self, n=64, task="classify", pad=4, ids=False, labels=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        self.task, self.pad, self.ids, self.labels = task, pad, ids, labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = {"input_ids": self.x[i]}
        if self.labels:
            if self.task == "classify":
                item["labels"] = self.x[i, 0] % 3
            else:
                lab = self.x[i].clone()
                lab[SEQ - self.pad :] = -100
                item["labels"] = lab
        if self.ids:
            item["sample_id"] = torch.tensor(i)
        return item


def trainer(model, out, callbacks=(), data=None, **kwargs):
    """A Trainer on the CPU, no reports, no progress bar, no checkpoints unless asked."""
    options = dict(
        per_device_train_batch_size=8,
        max_steps=6,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=2,
        seed=0,
    )
    options.update(kwargs)
    args = transformers.TrainingArguments(str(out), **options)
    return transformers.Trainer(
        model, args, train_dataset=data or Sequences(), callbacks=list(callbacks)
    )


class Witness(transformers.TrainerCallback):
    """Snapshots every trainable parameter around each optimizer step on its own hooks
    (registered on the optimizer inside accelerate's wrapper) and records, per step,
    the changed entries per tensor and the exact sums."""

    def __init__(self):
        self.m1 = 0.0
        self.m0 = 0
        self.steps: list[dict[str, tuple[int, int]]] = []  # name -> (changed, size)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        inner = optimizer.optimizer
        before: dict[str, torch.Tensor] = {}

        def pre(opt, a, k):
            for n, p in named:
                before[n] = p.detach().clone()

        def post(opt, a, k):
            step = {}
            for n, p in named:
                d = (p.detach() - before[n]).double()
                changed = int((d != 0).sum())
                self.m1 += float(d.abs().sum())
                self.m0 += changed
                step[n] = (changed, d.numel())
            self.steps.append(step)

        inner.register_step_pre_hook(pre)
        inner.register_step_post_hook(post)
