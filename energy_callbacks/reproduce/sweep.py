"""``size-sweep`` and ``combined``: energy to reach the target accuracy, per rule.

Both train the reference MLP (SCIENCE.md section 3: MSE loss, SGD lr 0.01,
batch 1, samples with replacement, a test every 2000 samples) until the target
accuracy, at most 5 epochs, and compare the energy with plain backprop.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import numpy as np

from .base import Experiment, paper_run
from .config import Config
from .paper import SUSTAINED_POINTS, Curve
from .report import (
    Summary,
    cell,
    fmt,
    group,
    markdown,
    mean_sd,
    power_law,
    ratio,
    seeds_phrase,
    values,
)
from .rules import RULES, get_rule
from .runner import RunResult, RunSpec

# The authors' reference code on Fashion-MNIST, N = 1000, 85%, one seed.
PUBLISHED = {
    "backprop": dict(epochs=0.57, m1=3.09e5, m1_min=3.15e3, inefficiency=98, m0=2.70e10),
    "equal-count": dict(epochs=1.00, m1=2.77e5, m1_min=4.42e3, inefficiency=63, m0=2.96e9),
    "fixed": dict(epochs=1.03, m1=1.67e5, m1_min=1.33e3, inefficiency=126, m0=4.93e9),
    "top-units": dict(epochs=0.57, m1=1.98e5, m1_min=3.28e3, inefficiency=61, m0=3.04e9),
}
FIDELITY_TOLERANCE = 0.30

SWEEP_SIZES = (100, 300, 1000, 3000, 10000)
SWEEP_RULES = (
    "backprop",
    "top-fraction",
    "equal-count",
    "top-units",
    "top-units-path",
    "fixed",
    "combined",
    "random-units",
    "random-synapses",
    "smallest",
)
QUICK_SIZES = (20, 60)
QUICK_RULES = ("backprop", "equal-count", "top-units-path", "fixed", "combined")
COMBINED_RULES = (
    "backprop",
    "combined",
    "combined+lazy",
    "combined+mistakes",
    "lazy",
    "mistakes",
)


class _EnergyToTarget(Experiment):
    """Runs (N, rule, seed) to the target accuracy with the paper's MSE loss."""

    full_rules: tuple[str, ...] = ()
    quick_rules: tuple[str, ...] = ()

    @abstractmethod
    def sizes(self) -> tuple[int, ...]:
        """The hidden sizes N to run."""

    def rules(self) -> tuple[str, ...]:
        names = self.config.rules or (self.quick_rules if self.config.quick else self.full_rules)
        for n in names:
            get_rule(n)  # unknown names fail before any training
        return tuple(names)

    def budget(self) -> tuple[int, int]:
        n_train = len(self.data.x_train) if self._data is not None else 60000
        return (
            self.config.pick("max_samples", 5 * n_train, 3000),
            self.config.pick("eval_every", 2000, 500),
        )

    def specs(self) -> list[RunSpec]:
        max_samples, eval_every = self.budget()
        target = self.config.accuracy_target
        return [
            RunSpec(
                self.key(N=n, rule=r, seed=s, target=target, max=max_samples, every=eval_every),
                f"N={n} {r} seed {s}",
                dict(n_hidden=n, rule=r, seed=s),
            )
            for n in self.sizes()
            for r in self.rules()
            for s in range(self.config.seeds)
        ]

    def execute(self, spec: RunSpec) -> RunResult:
        max_samples, eval_every = self.budget()
        return paper_run(
            self,
            spec,
            target=self.config.accuracy_target,
            max_samples=max_samples,
            eval_every=eval_every,
            confirm=SUSTAINED_POINTS,
        )


class SizeSweep(_EnergyToTarget):
    """Energy vs hidden size N for every rule (the reference experiment)."""

    name = "size-sweep"
    help = "energy to the target accuracy vs hidden size N, per rule (log-log plot)"
    full_rules = SWEEP_RULES
    quick_rules = QUICK_RULES

    def sizes(self) -> tuple[int, ...]:
        return self.config.sizes or (QUICK_SIZES if self.config.quick else SWEEP_SIZES)

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        text = f"# size-sweep ({_setup(rows, self.config)})\n\n" + _energy_table(rows, by_size=True)
        text += "\n## Scaling: fit of energy ∝ N^a over the sizes run\n\n" + _scaling(rows)
        return Summary(text, lambda fig: _plot_sizes(fig, rows))


class Combined(_EnergyToTarget):
    """Units + synapses (+ lazy / mistakes) against backprop at one size."""

    name = "combined"
    help = "a fixed path + its largest updates (+ lazy / mistakes) vs backprop at N = 1000"
    full_rules = COMBINED_RULES
    quick_rules = COMBINED_RULES

    def sizes(self) -> tuple[int, ...]:
        return self.config.sizes or ((60,) if self.config.quick else (1000,))

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        text = f"# combined ({_setup(rows, self.config)})\n\n" + _energy_table(rows, by_size=False)
        text += "\n" + _paired_savings(rows)
        return Summary(text, lambda fig: _plot_savings(fig, rows))


def _setup(rows: list[dict[str, Any]], config: Config) -> str:
    if not rows:
        return "no runs"
    r = rows[0]
    lr = "" if config.output_lr == "same" else f", output lr {config.output_lr}"
    return (
        f"{r['dataset']}, target {r['target']:.0%}, at most {r['max_samples']} samples"
        f"{lr}, {seeds_phrase(rows)}, mean ± sd"
    )


def _epochs_to_target(r: dict[str, Any]) -> float | str:
    """Epochs at the first test point at or above the target ('' if never)."""
    if r["samples_to_target"] == "" or not r["samples"]:
        return ""
    return float(r["samples_to_target"]) * float(r["epochs"]) / float(r["samples"])


def _median(xs: list[float]) -> str:
    return fmt(float(np.median(xs)), 3) if xs else "-"


def _energy_table(rows: list[dict[str, Any]], by_size: bool) -> str:
    """Per N and rule: how many runs sustained the target, the median epochs to its first
    crossing, M1 and M0 at the sustained crossing, and the savings against backprop."""
    base = {k[0]: g for k, g in group(rows, "n_hidden", "rule").items() if k[1] == "backprop"}
    header = [
        "N",
        "rule",
        "sustained",
        "epochs, median",
        "M1",
        "M0",
        "M1_min",
        "inefficiency",
        "M1 saved",
        "M0 saved",
        "learned",
    ]
    body = []
    ordered = sorted(group(rows, "n_hidden", "rule").items(), key=lambda kv: kv[0][0])
    for (n, rule), g in ordered:
        b = base.get(n)
        saved = [
            fmt(ratio(mean_sd(values(b, c))[0], mean_sd(values(g, c))[0]), 3) + "x"
            if b and all(r[c] != "" for r in g + b)
            else "-"
            for c in ("m1_sustained", "m0_sustained")
        ]
        epochs = [float(e) for e in map(_epochs_to_target, g) if e != ""]
        body.append(
            [
                str(n),
                RULES[rule].label if rule in RULES else rule,
                f"{sum(r['m1_sustained'] != '' for r in g)}/{len(g)}",
                _median(epochs),
                cell(g, "m1_sustained"),
                cell(g, "m0_sustained"),
                cell(g, "m1_min"),
                cell(g, "inefficiency"),
                *saved,
                f"{mean_sd(values(g, 'samples_learned'))[0]:.0%}",
            ]
        )
    if not by_size:
        header, body = header[1:], [row[1:] for row in body]
    note = (
        "\nM1, M0 and the savings at the sustained crossing: the first of two consecutive "
        "test points at or above the target (mean ± sd over seeds; '-' where a run never "
        "sustained it). Epochs: the median over seeds of the first crossing. M1_min and "
        "inefficiency where the run stopped.\n"
    )
    return markdown(header, body) + note


def _sizes_sustained(g: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """A rule's runs per N, only the sizes at which every run sustained the target."""
    by_n = {k[0]: v for k, v in sorted(group(g, "n_hidden").items())}
    return {n: v for n, v in by_n.items() if all(r["m1_sustained"] != "" for r in v)}


def _scaling(rows: list[dict[str, Any]]) -> str:
    """Slopes over the sizes at which every run of the rule sustained the target: a run
    stopped by the budget spent less than the target needs and would flatten the fit."""
    body, left_out = [], []
    for (rule,), g in group(rows, "rule").items():
        by_n = _sizes_sustained(g)
        left_out += [f"{rule} at N = {n}" for n in sorted({r["n_hidden"] for r in g} - set(by_n))]
        ns = list(by_n)
        if len(ns) < 2:
            continue  # one size has no slope
        exps = [
            power_law(ns, [mean_sd(values(v, c))[0] for v in by_n.values()])
            for c in ("m1_sustained", "m0_sustained", "samples_sustained")
        ]
        body.append(
            [
                RULES[rule].label if rule in RULES else rule,
                ", ".join(map(str, ns)),
                *(f"{a:.2f}" for a in exps),
            ]
        )
    note = f"\nLeft out (target not sustained): {', '.join(left_out)}.\n" if left_out else ""
    if not body:
        return "A fit needs two sizes per rule that sustained the target.\n" + note
    return markdown(["rule", "N", "a (M1)", "a (M0)", "a (samples)"], body) + note


def _paired_savings(rows: list[dict[str, Any]]) -> str:
    """Each rule against backprop of the same seed (same initial weights and samples), at
    the sustained crossing: M1 and M0 saved and the samples it took, mean ± sd."""
    base = {r["seed"]: r for r in rows if r["rule"] == "backprop"}
    body = []
    for (rule,), g in group(rows, "rule").items():
        pairs = [(base[r["seed"]], r) for r in g if rule != "backprop" and r["seed"] in base]
        if not pairs:
            continue
        columns = (("m1_sustained", True), ("m0_sustained", True), ("samples_sustained", False))
        cells = []
        for column, saved in columns:
            xs = [
                ratio(float(b[column]), float(r[column]))
                if saved
                else ratio(float(r[column]), float(b[column]))
                for b, r in pairs
                if b[column] != "" and r[column] != ""
            ]
            m, sd = mean_sd(xs)
            cells.append(
                "-"
                if len(xs) < len(pairs)
                else f"{fmt(m, 3)}x" + (f" ± {fmt(sd, 2)}" if len(xs) > 1 else "")
            )
        body.append([RULES[rule].label if rule in RULES else rule, f"{len(pairs)}", *cells])
    if not body:
        return ""
    header = ["rule", "seeds", "M1 saved", "M0 saved", "samples, x backprop's"]
    return (
        "Against backprop of the same seed, at the sustained crossing ('-': a run never "
        "sustained the target):\n\n" + markdown(header, body)
    )


def _plot_sizes(figure: Any, rows: list[dict[str, Any]]) -> None:
    """M1 and M0 at the sustained crossing against N, and backprop's over each rule's,
    with the fitted power of N in the legend."""
    axes = figure.subplots(1, 3)
    base = _sizes_sustained([r for r in rows if r["rule"] == "backprop"])
    for (rule,), g in group(rows, "rule").items():
        by_n = _sizes_sustained(g)
        ns = list(by_n)
        if not ns:
            continue
        for ax, column in zip(axes[:2], ("m1_sustained", "m0_sustained"), strict=True):
            stats = [mean_sd(values(v, column)) for v in by_n.values()]
            a = power_law(ns, [m for m, _ in stats])
            label = rule if math.isnan(a) else f"{rule} (N^{a:.2f})"
            ax.errorbar(
                ns,
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                label=label,
            )
        both = [n for n in ns if n in base]
        if rule != "backprop" and both:
            saving = [
                mean_sd(values(base[n], "m1_sustained"))[0]
                / mean_sd(values(by_n[n], "m1_sustained"))[0]
                for n in both
            ]
            a = power_law(both, saving)
            label = rule if math.isnan(a) else f"{rule} (N^{a:.2f})"
            axes[2].plot(both, saving, marker="o", label=label)
    titles = ("M1 = sum |dw|", "M0 = updates", "M1 saved: backprop / rule")
    for ax, title in zip(axes, titles, strict=True):
        if ax.has_data():
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("hidden units N")
        ax.set_title(f"{title}, to the target")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)


def _plot_savings(figure: Any, rows: list[dict[str, Any]]) -> None:
    axes = figure.subplots(1, 3)
    by_rule = group(rows, "rule")
    names = [k[0] for k in by_rule]
    for ax, column in zip(axes, ("m1", "m0", "samples"), strict=True):
        stats = [mean_sd(values(g, column)) for g in by_rule.values()]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title({"m1": "M1", "m0": "M0", "samples": "samples to target"}[column])
        ax.grid(True, axis="y", which="both", alpha=0.3)


EXPERIMENTS = (SizeSweep, Combined)
