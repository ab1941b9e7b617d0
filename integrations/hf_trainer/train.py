"""Fine-tuning with the Hugging Face Trainer, energy-saving plasticity dropped in.

A small BERT (built from a config: nothing is downloaded) learns to classify
scikit-learn's bundled digits, each 8x8 image read as a [CLS] token and 64 pixel
tokens (one token per position and intensity level; a transformer trained from
scratch on 1347 images reaches about 50% test accuracy in 240 steps: the point
is the pipeline). The Trainer, its AdamW, schedule, clipping and checkpoints are the
ordinary ones; the only addition is the callback in ``callbacks=[...]``. Memorized
mistakes key their memory by a ``sample_id`` column, which the Trainer keeps with
``remove_unused_columns=False`` and the callback takes out before the model. Run::

    python integrations/hf_trainer/train.py --steps 240 --out hf-run
    python integrations/hf_trainer/train.py --steps 480 --out hf-run --resume
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from energy_callbacks.data import load_digits  # noqa: E402
from energy_callbacks.transformers import PlasticityCallback  # noqa: E402

LEVELS = 4  # pixel intensities 0-255 in 4 levels
PIXELS = 64


def digit_sequences(split: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The digits as token sequences (token 0 is [CLS], then one id per pixel position
    and level), with their labels and sample ids."""
    part = getattr(load_digits(seed=seed), split)
    levels = torch.from_numpy(part.images.reshape(len(part.labels), PIXELS) // (256 // LEVELS))
    pixels = 1 + torch.arange(PIXELS) * LEVELS + levels.long()
    tokens = torch.cat([torch.zeros(len(pixels), 1, dtype=torch.long), pixels], 1)
    return [
        {"input_ids": t.long(), "labels": torch.tensor(int(y)), "sample_id": torch.tensor(i)}
        for i, (t, y) in enumerate(zip(tokens, part.labels, strict=True))
    ]


def small_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1 + PIXELS * LEVELS,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=1 + PIXELS,
        num_labels=10,
    )
    return BertForSequenceClassification(config)


def accuracy(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.stack([d["input_ids"] for d in data])
        labels = torch.stack([d["labels"] for d in data])
        return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--out", default="hf-run")
    parser.add_argument("--resume", action="store_true", help="from the last checkpoint in --out")
    parser.add_argument("--tensorboard", action="store_true", help="report_to='tensorboard'")
    args = parser.parse_args(argv)

    train, test = digit_sequences("train"), digit_sequences("test")
    model = small_bert()
    # --8<-- [start:trainer]
    energy = PlasticityCallback(synapses=0.1, samples="mistakes")
    training = TrainingArguments(
        args.out,
        max_steps=args.steps,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        weight_decay=0.01,
        logging_steps=20,
        save_steps=40,
        remove_unused_columns=False,  # keep sample_id: the mistake memory's key
        report_to="tensorboard" if args.tensorboard else "none",
        use_cpu=True,
    )
    trainer = Trainer(model, training, train_dataset=train, callbacks=[energy])
    energy.log_before_reporters(trainer)  # so that report_to integrations log it too
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    print(energy.report())
    # --8<-- [end:trainer]
    score = accuracy(model, test)
    report = energy.report()
    print(
        f"test accuracy {score:.3f}; learned from {report.samples_learned} of "
        f"{report.samples_seen} samples shown"
    )
    return {"report": report, "accuracy": score, "trainer": trainer}


if __name__ == "__main__":
    main()
