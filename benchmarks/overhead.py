"""Step-time overhead of the torch adapter on three real workloads, measured side by side.

Workloads (random data, CPU, one process):

- ``mlp``: the paper MLP 784-1000-10 (leaky ReLU, cross-entropy, SGD), batch 32;
  ``mlp-128``: the same at batch 128;
- ``cnn``: conv 32 - pool - conv 64 - pool - dense 128 - dense 10 on 28x28 images, batch 128;
- ``transformer``: a 2-layer TransformerEncoder language model (width 128, 4 heads,
  vocabulary 1000, causal mask), batch 32 x 128 tokens.

Each round builds every configuration of a workload and steps them batch by
batch, in a rotating order (with ``torch.optim.Adam.step()`` as one more), in a
plain torch loop (forward, backward, ``optimizer.step()``), which is also what
runs inside the Lightning callback; the machine's drift then hits every
configuration alike. Per configuration it reports:

- the median step time, and the median over batches of its step time over the
  plain step of the same batch;
- the hooks' own time (timed inside ``optimizer.step()`` around the adapter's
  pre- and post-step hooks), and that time divided by the median
  ``torch.optim.Adam.step()`` on the same parameters, a machine-independent unit.

The table shows the median over the rounds, with the range of the ratios.

On the classifiers (``mlp``, ``mlp-128``, ``cnn``) two more configurations measure
the sample gates' own cost: ``samples="lazy"`` and ``samples="mistakes"`` (memorized
mistakes, keyed by each sample's id), with ``gate_batch`` before every forward pass.
The labels are random, so most samples stay wrong and learn: the step does all its
work, and the ratio is what judging and gating add.

    python benchmarks/overhead.py                       # all three workloads
    python benchmarks/overhead.py --workloads mlp --rounds 9
    python benchmarks/overhead.py --workloads mlp mlp-128 --rounds 5   # the gates at b = 32, 128
    python benchmarks/overhead.py --keras tensorflow jax torch   # + Keras rows (the MLP)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from energy_callbacks import Plasticity, TopFraction, TopUnits  # noqa: E402
from energy_callbacks.torch import attach  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    model: Callable[[], nn.Module]
    batches: Callable[[int], list[Batch]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    combined: dict[str, Any]
    combined_name: str
    steps: int
    lr: float = 0.01
    gated: bool = False
    """A classifier: the sample gates get rows of their own."""


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 1000), nn.LeakyReLU(0.1), nn.Linear(1000, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


class LM(nn.Module):
    """A small causal TransformerEncoder language model: logits (batch, tokens, vocab)."""

    def __init__(self, vocab: int = 1000, width: int = 128, depth: int = 2, tokens: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        return self.head(self.encoder(h, mask=self.mask, is_causal=True))


def images(batch: int, size: tuple[int, ...]) -> Callable[[int], list[Batch]]:
    def make(n: int) -> list[Batch]:
        g = torch.Generator().manual_seed(0)
        return [
            (torch.randn(batch, *size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)
        ]

    return make


def token_batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        seq = torch.randint(0, 1000, (32, 129), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


PATH_COMBINED = {"units": TopUnits(0.1, path=True), "synapses": 0.1}
WORKLOADS = {
    "mlp": Workload(mlp, images(32, (784,)), nn.functional.cross_entropy, PATH_COMBINED,
                    "combined (path 10% units + top 10%)", 150, gated=True),
    "mlp-128": Workload(mlp, images(128, (784,)), nn.functional.cross_entropy, PATH_COMBINED,
                        "combined (path 10% units + top 10%)", 60, gated=True),
    "cnn": Workload(cnn, images(128, (1, 28, 28)), nn.functional.cross_entropy, PATH_COMBINED,
                    "combined (path 10% units + top 10%)", 40, gated=True),
    # A transformer's wiring is residual: no path to prove, so its combined rule has none.
    "transformer": Workload(LM, token_batches, token_loss,
                            {"units": TopUnits(0.1), "synapses": 0.1},
                            "combined (10% units + top 10%)", 16),
}  # fmt: skip
TARGETS = {  # (end-to-end ratio on cnn/transformer, hook cost in Adam steps)
    "tracking only": (1.05, 1.0),
    "TopFraction(0.1)": (1.3, 3.0),
}


def configs(workload: Workload) -> dict[str, dict[str, Any] | None]:
    cases: dict[str, dict[str, Any] | None] = {
        "plain": None,
        "tracking only": {},
        "TopFraction(0.1)": {"synapses": TopFraction(0.1)},
        workload.combined_name: dict(workload.combined),
    }
    if workload.gated:
        cases["lazy (samples='lazy')"] = {"samples": "lazy"}
        cases["memorized mistakes (samples='mistakes')"] = {"samples": "mistakes"}
    return cases


class HookTimer:
    """Times the adapter's optimizer hooks from hooks registered around them."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.times: list[float] = []
        self._t = [0.0, 0.0, 0.0]
        opt.register_step_pre_hook(lambda *a: self._mark(0))
        opt.register_step_post_hook(lambda *a: self._mark(2))

    def inner(self) -> None:
        """Register the second pair, after the adapter's hooks."""
        self.opt.register_step_pre_hook(lambda *a: self._mark(1))
        self.opt.register_step_post_hook(lambda *a: self._done())

    def _mark(self, i: int) -> None:
        self._t[i] = time.perf_counter()

    def _done(self) -> None:
        t0, t1, t2 = self._t
        self.times.append((t1 - t0) + (time.perf_counter() - t2))


class Runner:
    """One configuration's model and optimizer, stepped one batch at a time."""

    def __init__(self, workload: Workload, config: dict[str, Any] | None) -> None:
        torch.manual_seed(0)
        self.workload = workload
        self.model = workload.model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=workload.lr)
        self.timer = HookTimer(self.opt)
        self.handle = None
        if config is not None:
            self.handle = attach(self.model, self.opt, Plasticity(**config))
        self.gated = config is not None and "samples" in config
        self.timer.inner()
        self.times: list[float] = []

    def step(self, batch: Batch, index: int = 0) -> None:
        x, y = batch
        t0 = time.perf_counter()
        if self.gated:  # the batch's targets and sample ids, before its forward pass
            n = len(y)
            self.handle.gate_batch(y, torch.arange(index * n, (index + 1) * n))
        self.opt.zero_grad(set_to_none=True)
        self.workload.loss(self.model(x), y).backward()
        self.opt.step()
        self.times.append(time.perf_counter() - t0)


class AdamStep:
    """``torch.optim.Adam.step()`` on a copy of the workload's parameters, timed."""

    def __init__(self, workload: Workload) -> None:
        torch.manual_seed(0)
        model = workload.model()
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        self.times: list[float] = []

    def step(self, batch: Batch, index: int = 0) -> None:
        t0 = time.perf_counter()
        self.opt.step()
        self.times.append(time.perf_counter() - t0)


def one_round(workload: Workload, batches: list[Batch], warmup: int) -> dict[str, Any]:
    """Every configuration (and Adam) steps in turn, batch by batch, in a rotating order,
    so that the machine's drift hits all of them alike. Per configuration: the median
    step, the median of its per-batch ratio to the plain step, the median hook time."""
    runners: dict[str, Any] = {case: Runner(workload, c) for case, c in configs(workload).items()}
    runners["adam"] = AdamStep(workload)
    names = list(runners)
    for i in range(warmup + workload.steps):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            runners[name].step(batches[i % len(batches)], i % len(batches))
    plain = runners["plain"].times[warmup:]
    adam = statistics.median(runners["adam"].times[warmup:])
    out: dict[str, Any] = {"adam": adam}
    for case in configs(workload):
        r = runners[case]
        times = r.times[warmup:]
        hook = statistics.median(r.timer.times[warmup:]) if case != "plain" else 0.0
        ratio = statistics.median(t / p for t, p in zip(times, plain, strict=True))
        out[case] = (statistics.median(times), ratio, hook, hook / adam)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--keras",
        nargs="*",
        default=[],
        metavar="BACKEND",
        help="also measure the Keras callback on the MLP on these backends (tensorflow, jax, "
        "torch)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    for name in args.workloads:
        report(name, WORKLOADS[name], args)
    for backend in args.keras:
        keras_rows(backend, args)


def report(name: str, workload: Workload, args: argparse.Namespace) -> None:
    batches = workload.batches(8)
    params = sum(p.numel() for p in workload.model().parameters())
    cases = configs(workload)
    steps: dict[str, list[float]] = {c: [] for c in cases}
    ratios: dict[str, list[float]] = {c: [] for c in cases}
    hooks: dict[str, list[float]] = {c: [] for c in cases}
    in_adam: dict[str, list[float]] = {c: [] for c in cases}
    adams: list[float] = []
    for _ in range(args.rounds):
        result = one_round(workload, batches, args.warmup)
        adams.append(result["adam"])
        for case in cases:
            step, ratio, hook, adam_units = result[case]
            steps[case].append(step)
            ratios[case].append(ratio)
            hooks[case].append(hook)
            in_adam[case].append(adam_units)
    adam_ms = statistics.median(adams) * 1e3
    print(
        f"\n{name}: {params / 1e3:.0f}k parameters, batch {workload.batches(1)[0][0].shape[0]}, "
        f"Adam.step() {adam_ms:.2f} ms"
    )
    print(
        f"  {'configuration':<38} {'step ms':>8} {'ratio':>6} {'(min-max)':>11} {'hooks ms':>9} "
        f"{'in Adam steps':>14} {'(min-max)':>11}  target"
    )
    for case in cases:
        r, a = ratios[case], in_adam[case]
        target = TARGETS.get(case)
        aim = ""
        if target is not None:
            aim = f"<= {target[1]:g} Adam" + (f", <= {target[0]:g}x" if name != "mlp" else "")
        print(
            f"  {case:<38} {statistics.median(steps[case]) * 1e3:8.2f} {statistics.median(r):6.3f} "
            f"({min(r):.3f}-{max(r):.3f}) {statistics.median(hooks[case]) * 1e3:9.3f} "
            f"{statistics.median(a):14.2f} ({min(a):.2f}-{max(a):.2f})  {aim}"
        )


def keras_rows(backend: str, args: argparse.Namespace) -> None:
    """Run keras_overhead.py under ``backend`` (the MLP, batch 32) and print its rows."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_overhead.py")
    cmd = [sys.executable, script, "--json", "--rounds", str(args.rounds), "--batch-sizes", "32"]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if backend == "torch":
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"keras_overhead.py failed on {backend}:\n{proc.stderr[-3000:]}")
    print(f"\nkeras on {backend}, the MLP (wall time per step)")
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        cols = f"{r['ms']:8.2f} {r['ratio']:6.2f} ({r['min']:.2f}-{r['max']:.2f})"
        print(f"  {r['config']:<38} {cols}")


if __name__ == "__main__":
    main()
