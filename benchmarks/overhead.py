"""Step-time overhead of PlasticityCallback inside Lightning, measured side by side.

The paper MLP 784-1000-10 (leaky ReLU, cross-entropy, SGD) trains on random
data on the CPU. Each round fits every configuration for the same number of
steps, alternating, in one process. A step is timed from ``on_train_batch_start``
to ``on_train_batch_end`` (forward, backward, optimizer step and the callback's
hooks). The ratio is a configuration's median step time over the plain run's
in the same round; the table shows the median ratio over the rounds.

    python benchmarks/overhead.py                  # batch 8, 32, 128
    python benchmarks/overhead.py --batch-sizes 32 --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from energy_callbacks import TopFraction, TopUnits  # noqa: E402
from energy_callbacks.lightning import PlasticityCallback  # noqa: E402

CONFIGS = {
    "plain": None,
    "tracking only": lambda: PlasticityCallback(),
    "TopFraction(0.1)": lambda: PlasticityCallback(synapses=TopFraction(0.1)),
    "TopFraction(0.1, approximate=True)": lambda: PlasticityCallback(
        synapses=TopFraction(0.1, approximate=True)
    ),
    "combined (path 10% units + top 10%)": lambda: PlasticityCallback(
        units=TopUnits(0.1, path=True), synapses=0.1
    ),
}


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

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def median_step(config, batch_size: int, steps: int, warmup: int) -> float:
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
    return statistics.median(timer.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds")
    print(f"{'batch':>5}  {'configuration':<38} {'step ms':>8} {'ratio':>6}  (min-max)")
    for batch_size in args.batch_sizes:
        ratios: dict[str, list[float]] = {name: [] for name in CONFIGS}
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(args.rounds):
            base = None
            for name, config in CONFIGS.items():
                t = median_step(config, batch_size, args.steps, args.warmup)
                base = t if config is None else base
                times[name].append(t)
                ratios[name].append(t / base)
        for name in CONFIGS:
            r = ratios[name]
            print(
                f"{batch_size:>5}  {name:<38} {statistics.median(times[name]) * 1e3:8.2f} "
                f"{statistics.median(r):6.2f}  ({min(r):.2f}-{max(r):.2f})"
            )


if __name__ == "__main__":
    main()
