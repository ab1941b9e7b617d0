"""What each part of the torch adapter's post-step work costs, reference against fused.

The 784-1000-10 MLP trains with SGD in a plain torch loop (batch 32 by
default), so every part runs on the weights of a real step, with the caches as
forward and backward leave them. After each step the first layer's weight
(784k entries) goes through every part, each timed on its own:

- the NumPy reference (``NumpyOps``, the oracle) and the fused numba path
  (``FusedNumpyOps``, what the adapter uses), side by side in the same steps;
- the fused passes that measure a step and undo its dropped entries.

    python benchmarks/hook_parts.py
    python benchmarks/hook_parts.py --batch-size 128 --steps 400

Prints the median milliseconds per part. The numbers are per call on one
tensor; the adapter's step adds the small tensors and Python around them.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from energy_callbacks.core import fused
from energy_callbacks.core.ops import NumpyOps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not fused.AVAILABLE:
        raise SystemExit("hook_parts.py compares against the fused kernels: install numba")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1000), nn.LeakyReLU(0.1), nn.Linear(1000, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    reference, fast = NumpyOps(), fused.FusedNumpyOps()
    w = net[0].weight.detach().numpy()  # a zero-copy view: the optimizer writes here
    before, delta, spare = w.copy(), np.empty_like(w), np.empty_like(w)
    k = w.size // 10
    units = np.zeros(w.shape[0], dtype=bool)
    units[::10] = True
    unit_mask = reference.expand_units(units, w.shape, 0)
    ranked = np.empty_like(w)
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn, *fn_args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = fn(*fn_args)
        times[name].append(time.perf_counter() - start)
        return out

    for step in range(args.steps + args.warmup):
        if step == args.warmup:
            times.clear()
        x = torch.randn(args.batch_size, 784)
        y = torch.randint(0, 10, (args.batch_size,))
        np.copyto(before, w)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        timed("measure only: |dw| sum and count (fused)", fused.diff_totals, w, before)
        timed("the next snapshot: a copy", np.copyto, spare, w)
        timed("difference dw and its stats (fused)", fused.diff_stats, w, before, delta)
        flat = delta.reshape(-1)
        wanted = {}
        for approximate in (False, True):
            label = "approximate" if approximate else "exact"
            want = timed(
                f"top 10% |dw|, {label}: reference",
                reference.top_magnitude_mask,
                flat,
                k,
                approximate,
            )
            got = timed(
                f"top 10% |dw|, {label}: fused", fast.top_magnitude_mask, flat, k, approximate
            )
            if not np.array_equal(want, got):
                raise SystemExit(f"fused {label} selection differs from the reference")
            wanted[label] = want
        timed("unit scores (row L1): reference", reference.row_l1, delta, 0)
        timed("unit scores (row L1): fused", fast.row_l1, delta, 0)
        timed("keep under a unit mask: reference", reference.keep, delta, unit_mask, ranked)
        timed("keep under a unit mask: fused", fast.keep, delta, unit_mask, ranked)
        # The adapter's path at alpha = 1: the rules get w - before unwritten; the
        # approximate rule samples it, and one pass applies the threshold, undoes the
        # dropped entries and writes the next snapshot. Either undo runs on the real
        # weights, on alternate steps.
        if step % 2:
            timed("undo the dropped entries (fused)", fused.blend_stats, w, before, delta, got)
            continue
        threshold = timed(
            "top 10% of w - before, approximate, difference unwritten (fused)",
            fast.top_magnitude_mask,
            fused.Difference(w, before, delta),
            k,
            True,
        )
        timed(
            "apply that threshold and undo the rest: one pass (fused)",
            fused.blend_kept,
            w,
            before,
            threshold,
        )

    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, "
        f"{args.steps} steps; median ms per call on the 784x1000 weight"
    )
    for name, values in times.items():
        print(f"{np.median(values) * 1e3:8.3f}  {name}")


if __name__ == "__main__":
    main()
