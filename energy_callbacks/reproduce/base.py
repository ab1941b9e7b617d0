"""What an experiment is, and the run every training experiment shares.

An :class:`Experiment` lists its runs (:meth:`Experiment.specs`), executes one
(:meth:`Experiment.execute`) and writes its table and plot from the CSV rows
(:meth:`Experiment.summarize`). :func:`paper_run` trains one configuration of
the paper MLP through the Lightning callback and returns its CSV row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from .config import Config, Data
from .paper import fit_paper
from .rules import get_rule
from .runner import COLUMNS, RunResult, RunSpec

QUICK_TRAIN, QUICK_TEST = 5000, 1000


class Experiment(ABC):
    """One ``energy-callbacks reproduce`` experiment."""

    name: str = ""
    help: str = ""
    columns: tuple[str, ...] = COLUMNS
    """The CSV columns of its rows (the shared ones, unless an experiment adds some)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._data: Data | None = None

    @abstractmethod
    def specs(self) -> list[RunSpec]:
        """Every run of the sweep, with unique keys that include the settings."""

    @abstractmethod
    def execute(self, spec: RunSpec) -> RunResult:
        """Run one spec."""

    @abstractmethod
    def summarize(self, rows: list[dict[str, Any]], out: Path) -> str:
        """Write ``<name>.md`` and ``<name>.png`` into ``out``; return the markdown."""

    def preflight(self) -> None:
        """Fail before any training when something the experiment needs is missing."""
        self.specs()  # unknown rule names and bad settings raise here

    def load(self, data: Data) -> None:
        """Use ``data`` (the full set; ``--quick`` takes a subset of it)."""
        self._data = data.subset(QUICK_TRAIN, QUICK_TEST) if self.config.quick else data

    @property
    def data(self) -> Data:
        if self._data is None:
            raise RuntimeError(f"{self.name}: call load(data) before executing runs")
        return self._data

    def key(self, **params: Any) -> str:
        """``name|dataset|quick|k=v|...``: a run's identity in the CSV."""
        parts = [self.name, self.config.settings_key()]
        parts += [f"{k}={v}" for k, v in params.items()]
        return "|".join(parts)


def paper_run(
    experiment: Experiment,
    spec: RunSpec,
    *,
    loss: str = "mse",
    target: float | None,
    max_samples: int,
    eval_every: int,
) -> RunResult:
    """Train ``spec.params`` (rule, n_hidden, seed) to ``target`` or ``max_samples``."""
    p, data = spec.params, experiment.data
    torch.set_num_threads(experiment.config.threads)
    rule = get_rule(p["rule"])
    run = fit_paper(
        rule.build(p["n_hidden"], p["seed"]),
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        n_hidden=p["n_hidden"],
        n_outputs=data.n_classes,
        loss=loss,
        output_lr=experiment.config.output_lr_for(p["n_hidden"]),
        max_samples=max_samples,
        eval_every=eval_every,
        target=target,
        seed=p["seed"],
    )
    row = {
        "dataset": data.name,
        "rule": rule.name,
        "label": rule.label,
        "n_hidden": p["n_hidden"],
        "seed": p["seed"],
        "loss": loss,
        "target": experiment.config.accuracy_target,
        "max_samples": max_samples,
        **run.row(len(data.x_train), experiment.config.accuracy_target),
    }
    return RunResult(row, run.curve)
