"""``energy-callbacks reproduce EXPERIMENT``: the papers' findings, through the callbacks.

Experiments (each trains through :class:`energy_callbacks.lightning.PlasticityCallback`;
``frameworks`` also through :class:`energy_callbacks.keras.PlasticityCallback`):

- ``size-sweep``: energy to the target accuracy against the hidden size N, per rule;
- ``combined``: units + synapses (+ lazy / mistakes) against backprop at N = 1000;
- ``lazy``: lazy learning against backprop, each at its learning rate chosen on a
  validation split: time and backward passes to two targets, per batch size and
  training-set size;
- ``mistakes``: memorized mistakes vs lazy vs backprop, plain and class-incremental;
- ``frameworks``: one small configuration through Lightning and Keras (TensorFlow);
- ``caching``: synaptic caching against consolidating every update, at equal accuracy;
- ``concentration``: the share of backprop's M1 held by its most plastic hidden units.

Each writes ``<out>/<experiment>.csv`` (one row per run; a rerun skips the runs
already there), ``<experiment>_curves.csv`` (the test points), ``<experiment>.md``
(the table) and ``<experiment>.png`` (the plot). See docs/reproduce.md.
"""

from __future__ import annotations

from pathlib import Path

from .base import Experiment
from .caching import EXPERIMENTS as _CACHING
from .concentration import EXPERIMENTS as _CONCENTRATION
from .config import Config, Data, load_data
from .frameworks import EXPERIMENTS as _FRAMEWORKS
from .gating import EXPERIMENTS as _GATING
from .lazy import EXPERIMENTS as _LAZY
from .runner import Sweep
from .sweep import EXPERIMENTS as _SWEEP

EXPERIMENTS: dict[str, type[Experiment]] = {
    e.name: e for e in (*_SWEEP, *_LAZY, *_GATING, *_FRAMEWORKS, *_CACHING, *_CONCENTRATION)
}

__all__ = ["EXPERIMENTS", "Config", "Data", "Experiment", "load_data", "reproduce"]


def reproduce(
    name: str, config: Config, *, data: Data | None = None, show_progress: bool = True
) -> tuple[str, Path]:
    """Run (or resume) experiment ``name``; return its markdown table and the CSV path."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    experiment = EXPERIMENTS[name](config)
    experiment.preflight()
    experiment.load(data if data is not None else load_data(config))
    sweep = Sweep(config.out, name, experiment.columns)
    rows = sweep.run(experiment.specs(), experiment.execute, show_progress=show_progress)
    summary = experiment.summarize(rows, sweep.curves())
    summary.write(config.out, name)
    return summary.text, sweep.csv
