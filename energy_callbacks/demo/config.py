"""What the demo trains: its settings, its data and the network both frameworks start from.

Both frameworks train the same network from the same initial weights on the same
batches in the same order, so their figures can be compared line by line:

- :func:`initial_weights` draws the ``n_in - hidden - n_classes`` MLP's weights with
  NumPy, like torch's default ``Linear`` init (uniform in ``+-1/sqrt(fan_in)``);
- :func:`epoch_order` is the order of the training samples in each epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..reproduce.rules import RULES

DEFAULT_RULES = ("backprop", "combined", "lazy")
FRAMEWORKS = ("lightning", "keras")
DATASETS = ("digits", "idx")


class DemoConfigError(ValueError):
    """A demo setting is out of range; the message names the flag and the fix."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; invalid values raise :class:`DemoConfigError` naming the flag.

    ``frameworks=None`` means Lightning, and Keras too when it is installed.
    ``train_samples`` keeps the first that many training samples (None: all).
    """

    rules: tuple[str, ...] = DEFAULT_RULES
    frameworks: tuple[str, ...] | None = None
    hidden: int = 256
    epochs: int = 15
    batch_size: int = 32
    lr: float = 0.2
    seed: int = 0
    dataset: str = "digits"
    data_dir: Path | None = None
    train_samples: int | None = None
    out: Path = Path("demo-results")

    def __post_init__(self) -> None:
        for flag, value in (
            ("--hidden", self.hidden),
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
        ):
            if value < 1:
                raise DemoConfigError(f"{flag} must be >= 1, got {value}")
        if self.train_samples is not None and self.train_samples < 1:
            raise DemoConfigError(f"--train-samples must be >= 1, got {self.train_samples}")
        if not self.lr > 0:
            raise DemoConfigError(f"--lr must be > 0, got {self.lr}")
        if not self.rules:
            raise DemoConfigError("--rules is empty; name at least one rule, e.g. backprop")
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise DemoConfigError(
                f"--rules: unknown rule {unknown[0]!r}; choose from {', '.join(RULES)}"
            )
        if self.frameworks is not None:
            bad = [f for f in self.frameworks if f not in FRAMEWORKS]
            if bad or not self.frameworks:
                raise DemoConfigError(
                    f"--frameworks: got {','.join(self.frameworks) or 'nothing'}; "
                    f"choose from {', '.join(FRAMEWORKS)}"
                )
        if self.dataset not in DATASETS:
            raise DemoConfigError(
                f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}"
            )
        if self.dataset == "digits" and self.data_dir is not None:
            raise DemoConfigError("--data-dir goes with --dataset idx; digits are bundled")


@dataclass(frozen=True)
class DemoData:
    """Flattened, centred float32 inputs and int64 labels (the reference preprocessing)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def load_data(config: DemoConfig) -> DemoData:
    """The configured data set; FileNotFoundError or IDXError say what is missing."""
    from .. import data

    if config.dataset == "digits":
        ds = data.load_digits(seed=config.seed)
    else:
        ds = data.load_idx_dataset(config.data_dir or data.FASHION_MNIST_DIR)
    images, labels = ds.train.images, ds.train.labels
    if config.train_samples is not None:
        images, labels = images[: config.train_samples], labels[: config.train_samples]
    x_train, mean = data.paper_inputs(images)
    x_test, _ = data.paper_inputs(ds.test.images, mean)
    return DemoData(ds.name, x_train, labels, x_test, ds.test.labels, ds.n_classes)


def initial_weights(
    n_in: int, hidden: int, n_out: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(w1, b1, w2, b2)`` in torch's layout, ``w`` of shape (units, inputs), float32."""
    rng = np.random.default_rng(seed)

    def uniform(fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    return (
        uniform(n_in, (hidden, n_in)),
        uniform(n_in, (hidden,)),
        uniform(hidden, (n_out, hidden)),
        uniform(hidden, (n_out,)),
    )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training samples' order in ``epoch`` (a fresh permutation per epoch)."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
