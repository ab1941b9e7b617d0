"""Lazy learning's wall-clock claim: time to a test accuracy with the gradient gate and
with ``skip_backward=True``, against backprop, measured side by side in one process.

Setup: Fashion-MNIST (Debian's dataset-fashion-mnist), the paper MLP 784-1000-10
(leaky ReLU, the reference initialisation and preprocessing) with cross-entropy
and plain SGD, batches drawn with replacement, a test every 2000 samples (tests
are not timed), through :class:`energy_callbacks.lightning.PlasticityCallback`:

- ``backprop``: ``Plasticity()`` (measure only);
- ``lazy``: ``samples="lazy"``, the gradient gate (rejected samples' gradients are
  zeroed, their backward still runs);
- ``lazy, skip backward``: ``samples="lazy", skip_backward=True`` (a no-grad forward
  judges the batch, then forward and backward on the mistakes only);
- ``lazy, skip backward, full batches``: the same with ``backward_batch`` = the batch
  size (the mistakes of successive batches wait until there are a batch of them, so
  every backward pass and optimizer step is a full batch).

Each round runs the four in a rotating order per batch size; the table gives, per
configuration, the median over rounds of the training seconds and samples to the
target, and the time ratio to backprop of the same round. It also times the judging
forward pass alone against a backprop step on the same batch (the extra cost).

    python benchmarks/selective_backward.py                     # b = 32 and 128, 85%
    python benchmarks/selective_backward.py --batch-sizes 32 --rounds 1 --target 0.8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from energy_callbacks.lightning import PlasticityCallback
from energy_callbacks.reproduce import Config, load_data
from energy_callbacks.reproduce.paper import PaperModule, SampleStream, TestEvery, lean_trainer
from energy_callbacks.reproduce.runner import quiet_lightning

CONFIGS = {  # the callback's arguments at a batch size
    "backprop": lambda batch: {},
    "lazy": lambda batch: {"samples": "lazy"},
    "lazy, skip backward": lambda batch: {"samples": "lazy", "skip_backward": True},
    "lazy, skip backward, full batches": lambda batch: {
        "samples": "lazy",
        "skip_backward": True,
        "backward_batch": batch,
    },
}


def time_to_target(data, name, *, batch, lr, target, max_samples, seed, n_hidden):
    torch.manual_seed(seed)
    module = PaperModule(784, n_hidden, 10, loss="cross_entropy", lr=lr, seed=seed)
    energy = PlasticityCallback(**CONFIGS[name](batch))
    tester = TestEvery(
        torch.from_numpy(data.x_test), torch.from_numpy(data.y_test), target=target, energy=energy
    )
    stream = SampleStream(
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        max_samples // batch,
        batch_size=batch,
        seed=seed,
    )
    with warnings.catch_warnings(), quiet_lightning():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        lean_trainer([energy, tester]).fit(module, stream)
    hit = tester.curve.first_reaching(target)
    report = energy.report()
    return dict(
        reached=hit is not None,
        seconds=tester.curve.seconds[hit] if hit is not None else tester.curve.seconds[-1],
        samples=tester.curve.samples[hit] if hit is not None else tester.seen,
        learned=report.samples_learned / max(report.samples_seen, 1),
        accuracy=max(tester.curve.accuracy),
    )


def judge_cost(data, *, batch, lr, n_hidden, repeats=200):
    """Median seconds of a no-grad forward of a batch, and of a backprop step on it."""
    module = PaperModule(784, n_hidden, 10, loss="cross_entropy", lr=lr)
    opt = module.configure_optimizers()
    x = torch.from_numpy(data.x_train[:batch])
    y = torch.from_numpy(data.y_train[:batch])
    fwd, step = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            module(x).argmax(1)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        opt.zero_grad()
        module.training_step({"x": x, "y": y}, 0).backward()
        opt.step()
        step.append(time.perf_counter() - t)
    return statistics.median(fwd), statistics.median(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=1000)
    parser.add_argument("--max-samples", type=int, default=600_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(Config())
    print(
        f"Fashion-MNIST, 784-{args.hidden}-10, cross-entropy, SGD lr {args.lr}, target "
        f"{args.target:.0%}, at most {args.max_samples} samples, {args.rounds} round(s), "
        f"{args.threads} thread(s)\n"
    )
    print("| batch | rule | reached | samples to target | train s to target | vs backprop "
          "| learned | best acc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runs: dict[str, list[dict]] = {n: [] for n in CONFIGS}
        names = list(CONFIGS)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                runs[name].append(
                    time_to_target(
                        data,
                        name,
                        batch=batch,
                        lr=args.lr,
                        target=args.target,
                        max_samples=args.max_samples,
                        seed=r,
                        n_hidden=args.hidden,
                    )
                )
        base = runs["backprop"]
        for name, rs in runs.items():
            ratios = [b["seconds"] / x["seconds"] for b, x in zip(base, rs, strict=True)]
            print(
                f"| {batch} | {name} | {sum(x['reached'] for x in rs)}/{len(rs)} | "
                f"{statistics.median(x['samples'] for x in rs):.0f} | "
                f"{statistics.median(x['seconds'] for x in rs):.1f} | "
                f"{statistics.median(ratios):.2f}x faster "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{np.mean([x['learned'] for x in rs]):.0%} | "
                f"{max(x['accuracy'] for x in rs):.3f} |"
            )
        fwd, step = judge_cost(data, batch=batch, lr=args.lr, n_hidden=args.hidden)
        print(
            f"| {batch} | judging forward alone | | | {fwd * 1e3:.2f} ms | "
            f"{fwd / step:.2f} of a backprop step ({step * 1e3:.2f} ms) | | |"
        )


if __name__ == "__main__":
    main()
