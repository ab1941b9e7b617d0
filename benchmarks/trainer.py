"""Step-time overhead of the Hugging Face Trainer callback, measured side by side.

The workload: a tiny GPT-2 causal language model built from a config (2 layers,
width 128, 4 heads, vocabulary 1000), batch 8 x 128 tokens of random ids, the
Trainer's default AdamW with weight decay, its linear schedule and gradient
clipping, on the CPU. Three Trainers are built once in one process, the same
model and data each: without the callback, with ``PlasticityCallback()``
(tracking) and with ``PlasticityCallback(synapses=0.1)`` (the exact top 10%).
Each round trains every one of them for ``--steps`` steps, in a rotating order,
so the machine's drift hits each alike; a callback times every optimizer step
from ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping, step,
the callback's hooks) and the first steps of a round are dropped as warm-up.

Per configuration it prints the median step time and its ratio to the plain
Trainer's median of the same round, as the median (and range) over the rounds::

    python benchmarks/trainer.py
    python benchmarks/trainer.py --rounds 7 --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from energy_callbacks.transformers import PlasticityCallback  # noqa: E402

BATCH, TOKENS, VOCAB = 8, 128, 1000
CONFIGS = ("plain", "tracking", "top-fraction 0.1")
WARMUP = 3


class StepTimer(TrainerCallback):  # type: ignore[misc]
    """Wall-clock seconds of each optimizer step, from step begin to step end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, TOKENS), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(config: str, steps: int, out: str) -> tuple[Trainer, StepTimer]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=128,
            n_layer=2,
            n_head=4,
            n_positions=TOKENS,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if config == "tracking":
        callbacks.insert(0, PlasticityCallback())
    elif config != "plain":
        callbacks.insert(0, PlasticityCallback(synapses=0.1))
    args = TrainingArguments(
        os.path.join(out, config.replace(" ", "-")),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        weight_decay=0.01,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model, args, train_dataset=Tokens(BATCH * steps), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no summary line per train()
    return trainer, timer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per Trainer and round")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    ratios: dict[str, list[float]] = {c: [] for c in CONFIGS}
    medians: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            this: dict[str, float] = {}
            for config in order:
                trainer, timer = build(config, args.steps, out)
                trainer.train()
                this[config] = statistics.median(timer.times[WARMUP:])
            for config in CONFIGS:
                medians[config].append(this[config])
                ratios[config].append(this[config] / this["plain"])
    print(
        f"Trainer, tiny GPT-2 causal LM, batch {BATCH} x {TOKENS} tokens, "
        f"{args.rounds} rounds x {args.steps} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| configuration | median step (ms) | ratio to plain (median, range) |")
    print("|---|---|---|")
    for config in CONFIGS:
        r = ratios[config]
        print(
            f"| {config} | {1000 * statistics.median(medians[config]):.1f} | "
            f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f}) |"
        )


if __name__ == "__main__":
    main()
