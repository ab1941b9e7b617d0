"""Step-time overhead of PlasticityCallback inside Lightning, measured side by side.

The paper MLP 784-1000-10 (leaky ReLU, cross-entropy, SGD) trains on random
data on the CPU. Each round fits every configuration for the same number of
steps, alternating, in one process. Two step times are taken:

- ``compute``: from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
  backward, optimizer step and the callback's hooks);
- ``wall``: from one ``on_train_batch_start`` to the next, which adds Lightning's
  own loop, logging and data loading: what a user waits for per step.

The ratio is a configuration's median step time over the plain run's in the
same round; the table shows the median ratio over the rounds.

    python benchmarks/overhead.py                  # batch 8, 32, 128
    python benchmarks/overhead.py --batch-sizes 32 --rounds 9
    python benchmarks/overhead.py --keras tensorflow jax torch   # + Keras rows

Keras rows come from benchmarks/keras_overhead.py, run in a subprocess per
backend (Keras fixes its backend per process) on the same model and batches;
their step time is the wall time per step (Keras has no compute-only hook).
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from rules import configs  # noqa: E402
from torch import nn  # noqa: E402

from energy_callbacks.lightning import PlasticityCallback  # noqa: E402

CONFIGS = configs(PlasticityCallback)


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 1000), nn.LeakyReLU(0.1), nn.Linear(1000, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()
        self.starts.append(self._start)

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def median_step(config, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Median (compute, wall) step time in seconds."""
    torch.manual_seed(0)
    n = batch_size * (steps + warmup)
    data = torch.utils.data.TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
    timer = StepTimer()
    callbacks = [timer] if config is None else [config(), timer]
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLP(), torch.utils.data.DataLoader(data, batch_size=batch_size))
    starts = timer.starts[warmup:]
    wall = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return statistics.median(timer.times[warmup:]), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--keras",
        nargs="*",
        default=[],
        metavar="BACKEND",
        help="also measure the Keras callback on these backends (tensorflow, jax, torch)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    print(
        f"{'batch':>5}  {'configuration':<38} {'compute ms':>10} {'ratio':>6} (min-max)"
        f"   {'wall ms':>8} {'ratio':>6} (min-max)"
    )
    for batch_size in args.batch_sizes:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
        ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in CONFIGS}
        for _ in range(args.rounds):
            base = (1.0, 1.0)
            for name, config in CONFIGS.items():
                t = median_step(config, batch_size, args.steps, args.warmup)
                base = t if config is None else base
                runs[name].append(t)
                ratios[name].append((t[0] / base[0], t[1] / base[1]))
        for name in CONFIGS:
            cols = []
            for k in (0, 1):
                r = [x[k] for x in ratios[name]]
                ms = statistics.median(x[k] for x in runs[name]) * 1e3
                cols.append(f"{ms:10.2f} {statistics.median(r):6.2f} ({min(r):.2f}-{max(r):.2f})")
            print(f"{batch_size:>5}  {name:<38} {cols[0]}   {cols[1]}")
    for backend in args.keras:
        keras_rows(backend, args)


def keras_rows(backend: str, args: argparse.Namespace) -> None:
    """Run keras_overhead.py under ``backend`` and print its rows in this table's format."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_overhead.py")
    cmd = [
        sys.executable,
        script,
        "--json",
        "--rounds",
        str(args.rounds),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-sizes",
        *map(str, args.batch_sizes),
    ]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if backend == "torch":
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"keras_overhead.py failed on {backend}:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    print(f"keras on {backend} (wall time per step)")
    for r in json.loads(out.strip().splitlines()[-1]):
        cols = f"{r['ms']:8.2f} {r['ratio']:6.2f} ({r['min']:.2f}-{r['max']:.2f})"
        print(f"{r['batch']:>5}  {r['config']:<38} {'':>10} {'':>6} {'':>11}   {cols}")


if __name__ == "__main__":
    main()
