"""The least the torch adapter's hooks could cost on this machine: passes over the weights.

Whatever the design, measuring a step reads the weights after the step and a
copy from before it, and keeping a masked step's dropped entries writes the
weights again. This script trains the 784-1000-10 MLP with SGD in a plain
torch loop (batch 32 by default) and, after each real step, times on the first
layer's weight (784k entries, 99% of the parameters):

- a read-only pass: ``sum |w - w_before|`` (the least any measurement reads);
- the fused measuring pass the adapter runs (``diff_totals``) and the copy that
  makes the next snapshot;
- the approximate rule's least work: its strided sample and the one pass that
  applies the threshold (``blend_kept``), as the adapter runs them;
- the exact rule's passes without its selection: the difference, the bracket
  pass and the undo.

Each is timed once per step, rotating, so every part sees the weights as a
real step leaves them. The floor ratio is (plain step + part) / plain step.

    python benchmarks/floor.py
    python benchmarks/floor.py --batch-size 128 --steps 600
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from numba import njit
from torch import nn

from energy_callbacks.core import fused
from energy_callbacks.core.ops import bracket, bracket_sample


@njit(cache=True, nogil=True, fastmath=True)
def _read_only(after: Any, before: Any) -> float:
    acc = 0.0
    for i in range(after.size):
        acc += abs(np.float64(after[i] - before[i]))
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=40)
    args = parser.parse_args()
    if not fused.AVAILABLE:
        raise SystemExit("floor.py times the fused kernels: install numba")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1000), nn.LeakyReLU(0.1), nn.Linear(1000, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    w = net[0].weight.detach().numpy().reshape(-1)  # zero-copy: the optimizer writes here
    before, spare, delta = w.copy(), np.empty_like(w), np.empty_like(w)
    n, k = w.size, w.size // 10
    ops = fused.FusedNumpyOps()
    above, between = np.empty(n, bool), np.empty(n, bool)

    def approximate() -> None:
        mask = ops.top_magnitude_mask(fused.Difference(w, before, delta), k, approximate=True)
        fused.blend_kept(w, before, mask)

    def exact_passes() -> None:
        fused.diff_stats(w, before, delta)
        lo, hi = bracket(np.abs(bracket_sample(delta)), n, k)
        fused._split_bracket(delta, None, None, lo, hi, above, between)
        fused.blend_kept(w, before, above)

    def measuring() -> None:
        fused.diff_totals(w, before)
        np.copyto(spare, w)  # the next snapshot (a spare here: the other parts need before)

    parts = {
        "read-only pass: sum |w - w_before|": lambda: _read_only(w, before),
        "measuring pass + next snapshot (adapter, tracking)": measuring,
        "approximate: sample + one threshold pass (adapter)": approximate,
        "exact without its selection: difference, bracket pass, undo": exact_passes,
    }
    names = list(parts)
    plain: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(args.steps + args.warmup):
        x = torch.randn(args.batch_size, 784)
        y = torch.randint(0, 10, (args.batch_size,))
        np.copyto(before, w)
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        mid = time.perf_counter()
        name = names[step % len(names)]
        parts[name]()
        end = time.perf_counter()
        if step >= args.warmup:
            plain.append(mid - start)
            times[name].append(end - mid)
    base = statistics.median(plain)
    print(
        f"torch {torch.__version__}, batch {args.batch_size}, {args.steps} steps; "
        f"plain step {base * 1e3:.3f} ms (median)"
    )
    print(f"{'part (784x1000 weight)':<62} {'ms':>7} {'floor ratio':>12}")
    for name in names:
        ms = statistics.median(times[name])
        print(f"{name:<62} {ms * 1e3:7.3f} {(base + ms) / base:11.2f}x")


if __name__ == "__main__":
    main()
