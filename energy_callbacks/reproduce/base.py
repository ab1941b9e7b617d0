"""What an experiment is, and the run every training experiment shares.

An :class:`Experiment` lists its runs (:meth:`Experiment.specs`), executes one
(:meth:`Experiment.execute`) and writes its table and plot from the CSV rows
(:meth:`Experiment.summarize`). :func:`paper_run` trains one configuration of
the paper MLP through the Lightning callback and returns its CSV row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..core import Plasticity
from .config import Config, Data
from .paper import Curve, PaperRun, fit_paper
from .report import Summary
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
    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        """The table and plot of finished runs: their CSV rows and test curves by key."""

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

    def fit(
        self,
        plasticity: Plasticity,
        n_hidden: int,
        seed: int,
        *,
        data: Data | None = None,
        lr: float = 0.01,
        **kwargs: Any,
    ) -> PaperRun:
        """:func:`fit_paper` on ``data`` (default: this experiment's), with step size
        ``lr``, this experiment's torch threads and output step; ``kwargs`` go to it
        (``loss``, ``max_samples``, ``target``, ``phases``, ``batch_size``, ...)."""
        data = self.data if data is None else data
        torch.set_num_threads(self.config.threads)
        return fit_paper(
            plasticity,
            data.x_train,
            data.y_train,
            data.x_test,
            data.y_test,
            n_hidden=n_hidden,
            n_outputs=data.n_classes,
            lr=lr,
            output_lr=self.config.output_lr_for(n_hidden, lr),
            seed=seed,
            **kwargs,
        )

    def row(
        self,
        params: dict[str, Any],
        run: PaperRun,
        rule: str,
        label: str,
        loss: str,
        max_samples: int,
        data: Data | None = None,
    ) -> dict[str, Any]:
        """The CSV columns every training run shares: what ran, on what (``data``, default
        this experiment's), and its figures."""
        target = self.config.accuracy_target
        data = self.data if data is None else data
        return {
            "dataset": data.name,
            "rule": rule,
            "label": label,
            "n_hidden": params["n_hidden"],
            "seed": params["seed"],
            "loss": loss,
            "target": target,
            "max_samples": max_samples,
            **run.row(len(data.x_train), target),
        }


def paper_run(
    experiment: Experiment,
    spec: RunSpec,
    *,
    loss: str = "mse",
    target: float | None,
    max_samples: int,
    eval_every: int,
    confirm: int = 1,
) -> RunResult:
    """Train ``spec.params`` (rule, n_hidden, seed) to ``target`` (held for ``confirm``
    consecutive test points) or ``max_samples``."""
    p = spec.params
    rule = get_rule(p["rule"])
    run = experiment.fit(
        rule.build(p["n_hidden"], p["seed"]),
        p["n_hidden"],
        p["seed"],
        loss=loss,
        max_samples=max_samples,
        eval_every=eval_every,
        target=target,
        confirm=confirm,
        checkpoint=spec.checkpoint,
    )
    row = experiment.row(p, run, rule.name, rule.label, loss, max_samples)
    return RunResult(row, run.curve)
