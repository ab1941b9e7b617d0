"""What every experiment needs: the settings of a sweep and its data.

:class:`Config` holds the command-line choices (data set, seeds, quick or full,
overrides); :func:`load_data` reads the IDX files once and preprocesses them
(SCIENCE.md section 3: inputs scaled to [0.01, 0.99], then the training mean
subtracted, per pixel; ``--preprocessing reference`` subtracts one mean over all
pixels and adds N(0, 0.001) noise to the training and test inputs, as the authors'
code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import data

DATASETS = ("fashion-mnist", "mnist", "emnist-idx")
DEFAULT_TARGETS = {"fashion-mnist": 0.85, "mnist": 0.95, "emnist-idx": 0.85}
QUICK_TARGET = 0.7
PREPROCESSINGS = ("package", "reference")
REFERENCE_NOISE_SD = 0.001
OUTPUT_LR_REFERENCE_N = 1000


@dataclass(frozen=True)
class Config:
    """The settings of one ``energy-callbacks reproduce`` call.

    ``None`` fields take the experiment's default for full or ``quick`` runs.
    """

    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    seeds: int = 1
    quick: bool = False
    out: Path = Path("reproduce-results")
    target: float | None = None
    sizes: tuple[int, ...] | None = None
    rules: tuple[str, ...] | None = None
    max_samples: int | None = None
    eval_every: int | None = None
    threads: int = 1
    preprocessing: str = "package"
    output_lr: str = "same"
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset}")
        if self.dataset != "fashion-mnist" and self.data_dir is None:
            raise ValueError(
                f"--dataset {self.dataset} needs --data-dir DIR: a directory holding its IDX "
                "files (train-images-idx3-ubyte[.gz] ... or emnist-<subset>-train-images-...)"
            )
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"--target must be an accuracy in (0, 1], got {self.target}")
        for name in ("max_samples", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.sizes is not None and (not self.sizes or min(self.sizes) < 1):
            raise ValueError(f"--sizes must be hidden sizes >= 1, got {self.sizes}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"--preprocessing must be one of {', '.join(PREPROCESSINGS)}, "
                f"got {self.preprocessing!r}"
            )
        self.output_lr_for(1000)  # a bad --output-lr fails here

    def output_lr_for(self, n_hidden: int, lr: float = 0.01) -> float:
        """The output layer's SGD step size at hidden size ``n_hidden`` (``--output-lr``):
        ``same`` is ``lr`` (the setup of SCIENCE.md), ``scaled`` is
        ``lr * min(1, 1000 / N)``, so the output step stays that of N = 1000 (each output
        sums N hidden units), and a number is used as given."""
        if self.output_lr == "same":
            return lr
        if self.output_lr == "scaled":
            return lr * min(1.0, OUTPUT_LR_REFERENCE_N / n_hidden)
        try:
            value = float(self.output_lr)
        except ValueError:
            value = -1.0
        if not value > 0 or value == float("inf"):
            raise ValueError(
                f"--output-lr must be 'same', 'scaled' or a positive step size, "
                f"got {self.output_lr!r}"
            )
        return value

    def settings_key(self) -> str:
        """The data set and mode part of a run's key; non-default preprocessing and output
        step sizes are part of it, so their runs never mix with the default ones."""
        parts = [self.dataset]
        if self.preprocessing != "package":
            parts.append(f"prep-{self.preprocessing}")
        if self.output_lr != "same":
            parts.append(f"output-lr-{self.output_lr}")
        return "/".join(parts) + "|" + ("quick" if self.quick else "full")

    @classmethod
    def from_settings_key(cls, settings: str, **kwargs: object) -> Config:
        """The settings a :meth:`settings_key` names (``kwargs`` set the other fields):
        how a report finds the configuration of runs read back from a CSV."""
        data, _, mode = settings.partition("|")
        dataset, *parts = data.split("/")
        fields: dict[str, object] = {"dataset": dataset, "quick": mode == "quick"}
        for part in parts:
            name, _, value = part.partition("-")
            if name == "prep":
                fields["preprocessing"] = value
            elif part.startswith("output-lr-"):
                fields["output_lr"] = part.removeprefix("output-lr-")
            else:
                raise ValueError(f"unknown setting {part!r} in the run key part {settings!r}")
        if dataset != "fashion-mnist":
            fields.setdefault("data_dir", Path("."))  # a report reads no data set
        return cls(**{**fields, **kwargs})  # type: ignore[arg-type]

    @property
    def accuracy_target(self) -> float:
        """``--target``, else 0.7 with ``--quick``, else the data set's (85% / 95%)."""
        if self.target is not None:
            return self.target
        return QUICK_TARGET if self.quick else DEFAULT_TARGETS[self.dataset]

    def pick(self, name: str, full: int, quick: int) -> int:
        """The override ``name`` if given, else ``quick`` or ``full``."""
        value = getattr(self, name)
        if value is not None:
            return int(value)
        return quick if self.quick else full


@dataclass(frozen=True)
class Data:
    """Preprocessed float32 inputs and int64 labels; ``name`` and ``n_classes`` of the set."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    def subset(self, n_train: int | None, n_test: int | None, seed: int = 0) -> Data:
        """The first ``n_test`` test samples and a random ``n_train`` training subset."""
        x, y = self.x_train, self.y_train
        if n_train is not None and n_train < len(x):
            keep = np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))
            x, y = x[keep], y[keep]
        t = slice(None) if n_test is None else slice(0, n_test)
        return Data(self.name, x, y, self.x_test[t], self.y_test[t], self.n_classes)

    def validation(self, n_val: int, seed: int = 0) -> Data:
        """The training set split in two: ``n_val`` random samples become the test set
        (a validation split, for choosing settings without the test set), the rest the
        training set."""
        if not 0 < n_val < len(self.x_train):
            raise ValueError(
                f"a validation split needs 0 < n_val < {len(self.x_train)} samples, got {n_val}"
            )
        order = np.random.default_rng(seed).permutation(len(self.x_train))
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        return Data(
            f"{self.name} (validation split)",
            self.x_train[train],
            self.y_train[train],
            self.x_train[val],
            self.y_train[val],
            self.n_classes,
        )


def load_data(config: Config) -> Data:
    """Read the data set of ``config`` (no download) and preprocess it."""
    if config.dataset == "fashion-mnist":
        ds = data.load_fashion_mnist(config.data_dir or data.FASHION_MNIST_DIR)
    elif config.dataset == "mnist":
        ds = data.load_idx_dataset(config.data_dir, name="mnist")  # type: ignore[arg-type]
    else:
        ds = data.load_idx_dataset(config.data_dir)  # type: ignore[arg-type]
    per_pixel = config.preprocessing == "package"
    x_train, mean = data.paper_inputs(ds.train.images, per_pixel=per_pixel)
    x_test, _ = data.paper_inputs(ds.test.images, mean)
    name = ds.name
    if not per_pixel:  # the reference code: one mean, and N(0, 0.001) noise on all inputs
        rng = np.random.default_rng(0)
        x_train = x_train + rng.normal(0.0, REFERENCE_NOISE_SD, x_train.shape).astype(np.float32)
        x_test = x_test + rng.normal(0.0, REFERENCE_NOISE_SD, x_test.shape).astype(np.float32)
        name = f"{ds.name} (reference preprocessing)"
    return Data(name, x_train, ds.train.labels, x_test, ds.test.labels, ds.n_classes)
