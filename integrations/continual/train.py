"""Class-incremental learning with memorized mistake gating and a replay buffer of
flagged samples only.

The classes arrive in tasks (Fashion-MNIST: 0-1, then 2-3, ...). In each task the
network learns from the new classes' samples plus the replay buffer, through a
plain PyTorch loop with ``energy_callbacks.torch.attach``. Under
``MemorizedMistakes`` a sample teaches only if the network gets it wrong now or
got it wrong at an earlier presentation, so a sample that was never wrong
cannot teach again: only the flagged samples are worth keeping. After each
task the buffer takes the task's flagged samples and nothing else, which is the
memory saving of the mistake-gating paper (Pache & van Rossum, arXiv:2604.14336).

Run (Fashion-MNIST from /usr/share/datasets/fashion-mnist, Debian's
``dataset-fashion-mnist``)::

    python integrations/continual/train.py                    # all 60 000 samples, ~2 min
    python integrations/continual/train.py --per-class 1000
    python integrations/continual/train.py --dataset digits   # bundled, no files needed

``--replay none`` trains without the buffer, for comparison: the old classes are
then forgotten.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from energy_callbacks import MemorizedMistakes, Plasticity
from energy_callbacks.data import FASHION_MNIST_DIR, load_digits, load_fashion_mnist, paper_inputs
from energy_callbacks.torch import attach


@dataclass
class ReplayBuffer:
    """Stored samples of earlier tasks: inputs, labels and their ids (the memory's keys)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def empty(cls, n_features: int) -> ReplayBuffer:
        return cls(np.zeros((0, n_features), np.float32), np.zeros(0, np.int64))

    def add(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> None:
        self.x = np.concatenate([self.x, x])
        self.y = np.concatenate([self.y, y])
        self.ids = np.concatenate([self.ids, ids])

    def __len__(self) -> int:
        return len(self.y)


def load(args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    """Training and test inputs and labels, at most ``--per-class`` training samples a class."""
    if args.dataset == "digits":
        ds = load_digits(seed=args.seed)
    else:
        ds = load_fashion_mnist(args.data_dir)
    keep = np.concatenate(
        [np.flatnonzero(ds.train.labels == c)[: args.per_class] for c in range(ds.n_classes)]
    )
    keep.sort()
    x, mean = paper_inputs(ds.train.images[keep])
    x_test, _ = paper_inputs(ds.test.images, mean)
    return x, ds.train.labels[keep], x_test, ds.test.labels


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(1).numpy()
    return float(np.mean(predicted == y)) if len(y) else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=str(FASHION_MNIST_DIR))
    parser.add_argument("--per-class", type=int, default=None, help="training samples a class")
    parser.add_argument("--classes-per-task", type=int, default=2)
    parser.add_argument("--epochs-per-task", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--replay", choices=["flagged", "none"], default="flagged")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y, x_test, y_test = load(args)
    ids = np.arange(len(y))  # a sample's id: its row in the training set
    n_classes = int(y.max()) + 1
    tasks = [
        list(range(c, min(c + args.classes_per_task, n_classes)))
        for c in range(0, n_classes, args.classes_per_task)
    ]

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], args.hidden), nn.ReLU(), nn.Linear(args.hidden, n_classes)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # --8<-- [start:tasks]
    gate = MemorizedMistakes()
    handle = attach(model, optimizer, Plasticity(samples=gate))
    buffer = ReplayBuffer.empty(x.shape[1])
    rows = []
    print("task  classes  seen  buffer  acc(seen classes)  acc(first task)  learned  M1  M0")
    for t, classes in enumerate(tasks):
        new = np.isin(y, classes)  # this task's samples; earlier ones only via the buffer
        train_x = np.concatenate([x[new], buffer.x])
        train_y = np.concatenate([y[new], buffer.y])
        train_ids = np.concatenate([ids[new], buffer.ids])
        seen_before, learned_before = (
            handle.plasticity.samples_seen,
            handle.plasticity.samples_learned,
        )
        for _epoch in range(args.epochs_per_task):
            order = rng.permutation(len(train_y))
            for start in range(0, len(order), args.batch_size):
                batch = order[start : start + args.batch_size]
                xb, yb = torch.from_numpy(train_x[batch]), torch.from_numpy(train_y[batch])
                handle.gate_batch(yb, train_ids[batch])  # targets and ids of the next forward
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()  # skipped when no sample of the batch may learn
        if args.replay == "flagged":
            flagged = gate.memory.get(ids[new])  # this task's samples that were ever wrong
            buffer.add(x[new][flagged], y[new][flagged], ids[new][flagged])
        # --8<-- [end:tasks]
        report = handle.report()
        seen_classes = [c for task in tasks[: t + 1] for c in task]
        shown = report.samples_seen - seen_before
        row = {
            "task": t,
            "classes": classes,
            "samples_so_far": int(np.isin(y, seen_classes).sum()),
            "buffer": len(buffer),
            "buffer_ids": buffer.ids.copy(),
            "accuracy_seen": accuracy(model, *_subset(x_test, y_test, seen_classes)),
            "accuracy_first": accuracy(model, *_subset(x_test, y_test, tasks[0])),
            "learned": (report.samples_learned - learned_before) / max(shown, 1),
            "m1": report.m1,
            "m0": report.m0,
        }
        rows.append(row)
        print(
            f"{t:>4}  {'-'.join(map(str, classes)):>7}  {row['samples_so_far']:>4}  "
            f"{row['buffer']:>6}  {row['accuracy_seen']:>17.3f}  {row['accuracy_first']:>15.3f}"
            f"  {row['learned']:>7.0%}  {report.m1:.3g}  {report.m0:.3g}"
        )
    handle.detach()
    last = rows[-1]
    print(
        f"replay buffer: {last['buffer']} of {last['samples_so_far']} training samples "
        f"({last['buffer'] / last['samples_so_far']:.0%}), only those ever misclassified"
    )
    return {"tasks": rows, "flagged": gate.memory.flagged(), "labels": y}


def _subset(x: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(y, classes)
    return x[keep], y[keep]


if __name__ == "__main__":
    main()
