"""``concentration``: where backprop's plasticity goes, unit by unit.

The competitive-plasticity paper observes that under backprop the plasticity
concentrates in a few hidden units (roughly 60-100), which is what makes
restricting it to a few units cheap. This experiment trains the paper's setup
(MSE, SGD lr 0.01, batch 1) to the sustained target, like ``size-sweep``, and adds
up, for every hidden unit, the |dw| of its incoming synapses (its row of the
first weight matrix and its bias) over the run. A :class:`UnitEnergy` callback
snapshots those weights before each optimizer step and reads the applied change
after it, so it measures any rule's real update.

Per run: the share of the hidden layer's M1 held by its most plastic 10, 30, 60,
100, 300 and 1000 units, and how many units hold half of it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from .paper import SUSTAINED_POINTS, Curve
from .report import Summary, cell, group, markdown, mean_sd, seeds_phrase, values
from .rules import RULES, get_rule
from .runner import COLUMNS, RunResult, RunSpec
from .sweep import _EnergyToTarget

TOP_UNITS = (10, 30, 60, 100, 300, 1000)
CONCENTRATION_COLUMNS = (
    *COLUMNS,
    *(f"share_top_{k}" for k in TOP_UNITS),
    "units_for_half",
    "hidden_m1",
)


class UnitEnergy(Callback):
    """Sum of |dw| per hidden unit (incoming weights and bias) of ``pl_module.net[0]``,
    from a snapshot before each optimizer step and the weights after it (float64)."""

    def __init__(self) -> None:
        self.energy: torch.Tensor | None = None
        self._before: tuple[torch.Tensor, torch.Tensor] | None = None

    def _layer(self, pl_module: pl.LightningModule) -> torch.nn.Linear:
        return pl_module.net[0]  # type: ignore[index, return-value]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.energy is None:
            self.energy = torch.zeros(self._layer(pl_module).out_features, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"energy": self.energy}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.energy = state_dict["energy"]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        layer = self._layer(pl_module)
        self._before = (layer.weight.detach().clone(), layer.bias.detach().clone())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._before is None or self.energy is None:
            return  # no optimizer step this batch
        layer, (w, b) = self._layer(pl_module), self._before
        with torch.no_grad():
            dw = (layer.weight - w).abs().sum(1, dtype=torch.float64)
            self.energy += dw + (layer.bias - b).abs().double()
        self._before = None


def concentration(energy: np.ndarray) -> dict[str, Any]:
    """The CSV figures of per-unit energies: shares held by the top units, and how many
    units hold half of the total."""
    ranked = np.sort(np.asarray(energy, dtype=np.float64))[::-1]
    total = float(ranked.sum())
    cumulative = np.cumsum(ranked) / total if total > 0 else np.zeros_like(ranked)
    out: dict[str, Any] = {
        f"share_top_{k}": float(cumulative[min(k, len(ranked)) - 1]) if total > 0 else ""
        for k in TOP_UNITS
    }
    out["units_for_half"] = int(np.searchsorted(cumulative, 0.5) + 1) if total > 0 else ""
    out["hidden_m1"] = total
    return out


class Concentration(_EnergyToTarget):
    """The share of backprop's M1 held by the most plastic hidden units, per N."""

    name = "concentration"
    help = "the share of backprop's M1 held by its most plastic hidden units, per N"
    columns = CONCENTRATION_COLUMNS

    full_rules = ("backprop",)
    quick_rules = ("backprop",)

    def sizes(self) -> tuple[int, ...]:
        return self.config.sizes or ((60,) if self.config.quick else (1000, 3000))

    def execute(self, spec: RunSpec) -> RunResult:
        p = spec.params
        max_samples, every = self.budget()
        rule, units = get_rule(p["rule"]), UnitEnergy()
        run = self.fit(
            rule.build(p["n_hidden"], p["seed"]),
            p["n_hidden"],
            p["seed"],
            max_samples=max_samples,
            eval_every=every,
            target=self.config.accuracy_target,
            confirm=SUSTAINED_POINTS,
            callbacks=[units],
            checkpoint=spec.checkpoint,
        )
        row = self.row(p, run, rule.name, rule.label, "mse", max_samples)
        assert units.energy is not None
        row.update(concentration(units.energy.numpy()))
        return RunResult(row, run.curve)

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        text = f"# concentration ({_setup(rows)})\n\n" + _table(rows)
        return Summary(text, lambda fig: _plot(fig, rows))


def _setup(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    r = rows[0]
    return (
        f"{r['dataset']}, MSE, SGD lr 0.01, batch 1, to the sustained {r['target']:.0%}, "
        f"{seeds_phrase(rows)}, mean ± sd"
    )


def _table(rows: list[dict[str, Any]]) -> str:
    body = []
    for (n, rule), g in sorted(group(rows, "n_hidden", "rule").items()):
        shares = []
        for k in TOP_UNITS:
            if k < n:
                xs = [100 * v for v in values(g, f"share_top_{k}")]
                m, sd = mean_sd(xs)
                spread = f" ± {sd:.0f}" if len(xs) > 1 else ""
                shares.append(f"{m:.0f}{spread}% ({100 * k / n:.0f}%)")
            else:
                shares.append("-")
        body.append(
            [
                str(n),
                RULES[rule].label if rule in RULES else rule,
                *shares,
                cell(g, "units_for_half"),
            ]
        )
    header = ["N", "rule", *(f"top {k}" for k in TOP_UNITS), "units holding half"]
    return markdown(header, body) + (
        "\nThe share of the hidden layer's M1 (incoming weights and biases) held by the "
        "most plastic units over the whole run, mean ± sd over seeds; in brackets, the "
        "share those units would hold if every unit changed alike.\n"
    )


def _plot(figure: Any, rows: list[dict[str, Any]]) -> None:
    ax = figure.subplots(1, 1)
    for (n, rule), g in sorted(group(rows, "n_hidden", "rule").items()):
        ks = [k for k in TOP_UNITS if k < n]
        shares = [mean_sd(values(g, f"share_top_{k}"))[0] for k in ks]
        ax.plot(ks, shares, marker="o", label=f"{rule}, N = {n}")
        ax.plot(ks, [k / n for k in ks], ":", color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("most plastic hidden units")
    ax.set_ylabel("share of the hidden layer's M1 (dotted: all units alike)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


EXPERIMENTS = (Concentration,)
