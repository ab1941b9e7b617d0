"""``caching``: synaptic caching against consolidating every update, at equal accuracy.

The reference MLP (SCIENCE.md section 3: MSE loss, SGD lr 0.01, batch 1, samples
with replacement, a test every 2000 samples) trains through the Lightning
callback until the target accuracy, once plainly ("every update": each applied
update is consolidated as it comes, energy = M1) and once per caching
configuration ``Caching(theta, tau, maintenance_cost)`` of the sweep. A run
stops at its first test point at or above the target and the end of fit
consolidates the store, so every run that reaches the target is measured at
the same accuracy. The saving is the energy of "every update" over the
caching energy (consolidation + maintenance).

The sweep is ``thetas x taus x maintenance_costs`` (``Config.extra`` or the
command line's ``--thetas``, ``--taus``, ``--maintenance-costs``; ``inf`` is
no decay).
"""

from __future__ import annotations

import math
from typing import Any

from ..core import Caching, Plasticity
from .base import Experiment
from .paper import Curve
from .report import Summary, cell, fmt, group, markdown, mean_sd, ratio, seeds_phrase, values
from .runner import COLUMNS, RunResult, RunSpec

CACHING_COLUMNS = (
    *COLUMNS,
    "theta",
    "tau",
    "maintenance_cost",
    "scope",
    "energy",
    "energy_consolidation",
    "energy_maintenance",
    "consolidations",
)
FULL = dict(thetas="0.001,0.003,0.01,0.03", taus="inf", costs="1e-4,1e-3,1e-2")
QUICK = dict(thetas="0.003,0.03", taus="inf,2000", costs="1e-3")
EVERY_UPDATE = "every-update"


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers, got {text!r}") from None


class CachingSweep(Experiment):
    """Synaptic caching (a sweep of theta, tau, maintenance cost) against every update."""

    name = "caching"
    help = "synaptic caching vs consolidating every update, at equal accuracy"
    columns = CACHING_COLUMNS

    def size(self) -> int:
        return (self.config.sizes or ((30,) if self.config.quick else (300,)))[0]

    def budget(self) -> tuple[int, int]:
        return (
            self.config.pick("max_samples", 80_000, 3000),
            self.config.pick("eval_every", 2000, 500),
        )

    def grid(self) -> list[tuple[float, float, float]]:
        """``(theta, tau, maintenance_cost)`` of every caching run (checked here)."""
        defaults = QUICK if self.config.quick else FULL
        extra = self.config.extra
        thetas = _floats(extra.get("thetas", defaults["thetas"]), "thetas")
        taus = _floats(extra.get("taus", defaults["taus"]), "taus")
        costs = _floats(extra.get("maintenance_costs", defaults["costs"]), "maintenance-costs")
        grid = [(t, tau, c) for c in costs for tau in taus for t in thetas]
        for t, tau, c in grid:
            Caching(t, tau, c)  # bad values fail before any training
        return grid

    def specs(self) -> list[RunSpec]:
        max_samples, every = self.budget()
        n, target = self.size(), self.config.accuracy_target
        common = dict(N=n, target=target, max=max_samples, every=every)
        specs = []
        for s in range(self.config.seeds):
            key = self.key(rule=EVERY_UPDATE, **common, seed=s)
            specs.append(RunSpec(key, f"every update seed {s}", dict(n_hidden=n, seed=s)))
            for theta, tau, c in self.grid():
                key = self.key(theta=theta, tau=tau, c=c, **common, seed=s)
                title = f"theta={theta:g} tau={tau:g} c={c:g} seed {s}"
                specs.append(
                    RunSpec(key, title, dict(n_hidden=n, seed=s, theta=theta, tau=tau, c=c))
                )
        return specs

    def execute(self, spec: RunSpec) -> RunResult:
        p = spec.params
        max_samples, eval_every = self.budget()
        cached = "theta" in p
        caching = Caching(p["theta"], p["tau"], p["c"]) if cached else None
        run = self.fit(
            Plasticity(caching=caching),
            p["n_hidden"],
            p["seed"],
            max_samples=max_samples,
            eval_every=eval_every,
            target=self.config.accuracy_target,
            checkpoint=spec.checkpoint,
        )
        rep = run.report
        rule = "caching" if cached else EVERY_UPDATE
        label = repr(caching) if cached else "consolidate every update"
        row = {
            **self.row(p, run, rule, label, "mse", max_samples),
            "theta": p.get("theta", ""),
            "tau": p.get("tau", ""),
            "maintenance_cost": p.get("c", ""),
            "scope": caching.scope if caching is not None else "",
            "energy": rep.energy,
            "energy_consolidation": rep.consolidation if cached else rep.m1,
            "energy_maintenance": rep.maintenance if cached else 0.0,
            "consolidations": rep.updates,
        }
        return RunResult(row, run.curve)

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        max_samples, _ = self.budget()
        same = (self.size(), self.config.accuracy_target, max_samples)
        rows = [r for r in rows if (r["n_hidden"], r["target"], r["max_samples"]) == same]
        text = f"# caching ({_setup(rows)})\n\n" + caching_table(rows)
        return Summary(text, lambda fig: _plot(fig, rows))


def _setup(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    r = rows[0]
    return (
        f"{r['dataset']}, N = {r['n_hidden']}, target {r['target']:.0%} (runs stop there), at "
        f"most {r['max_samples']} samples, {seeds_phrase(rows)}, mean ± sd"
    )


def _stopped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that reached the target (they stopped there: equal accuracy)."""
    return [r for r in rows if r["reached"] in (True, "True")]


def caching_table(rows: list[dict[str, Any]]) -> str:
    """The table of every configuration, and the best saving at equal accuracy."""
    base = _stopped([r for r in rows if r["rule"] == EVERY_UPDATE])
    base_energy = mean_sd(values(base, "energy"))[0] if base else math.nan
    header = [
        "configuration",
        "reached",
        "samples to target",
        "test acc",
        "energy",
        "consolidation",
        "maintenance",
        "writes",
        "M1 of its updates",
        "M1_min",
        "saving",
    ]
    body, savings = [], []
    groups = group(rows, "rule", "theta", "tau", "maintenance_cost")
    for (rule, theta, tau, c), g in sorted(groups.items(), key=_by_setting):
        reached = _stopped(g)
        energy = mean_sd(values(reached, "energy"))[0] if reached else math.nan
        saving = ratio(base_energy, energy) if len(reached) == len(g) else math.nan
        name = "every update" if rule == EVERY_UPDATE else f"theta={theta:g} tau={tau:g} c={c:g}"
        if rule != EVERY_UPDATE and saving == saving:
            savings.append((saving, name))
        body.append(
            [
                name,
                f"{len(reached)}/{len(g)}",
                cell(reached, "samples_to_target"),
                cell(g, "accuracy"),
                cell(reached, "energy"),
                cell(reached, "energy_consolidation"),
                cell(reached, "energy_maintenance"),
                cell(reached, "consolidations"),
                cell(reached, "m1"),
                cell(reached, "m1_min"),
                "-" if saving != saving else f"{fmt(saving)}x",
            ]
        )
    text = markdown(header, body)
    text += (
        "\nenergy = consolidation + maintenance (every update: M1); writes = consolidation "
        "writes (every update: M0); saving = energy of every update / energy, over runs that "
        "all reached the target (equal accuracy).\n"
    )
    if savings:
        best, name = max(savings)
        text += f"\nBest saving at equal accuracy: {fmt(best)}x ({name}).\n"
        by_cost: dict[str, float] = {}
        for s, n in savings:
            c = n.rsplit("c=", 1)[1]
            by_cost[c] = max(by_cost.get(c, 0.0), s)
        text += "".join(
            f"- maintenance cost {c}: best {fmt(s)}x\n"
            for c, s in sorted(by_cost.items(), key=lambda item: float(item[0]))
        )
    return text


def _by_setting(item: tuple[tuple, Any]) -> tuple:
    """Every update first, then the caching runs by maintenance cost, tau and theta."""
    rule, theta, tau, c = item[0]
    return (0,) if rule == EVERY_UPDATE else (1, c, tau, theta)


def _plot(figure: Any, rows: list[dict[str, Any]]) -> None:
    """Energy to the target against theta, one line per (tau, c); runs that missed it are left
    out, and an empty plot says so (log axes need one positive value)."""
    ax = figure.subplots(1, 1)
    plotted = False
    base = _stopped([r for r in rows if r["rule"] == EVERY_UPDATE])
    if base:
        ax.axhline(mean_sd(values(base, "energy"))[0], color="grey", label="every update")
        plotted = True
    cached = [r for r in rows if r["rule"] != EVERY_UPDATE]
    for (tau, c), g in sorted(group(cached, "tau", "maintenance_cost").items()):
        points = []
        for (theta,), runs in sorted(group(g, "theta").items()):
            reached = _stopped(runs)
            energy = mean_sd(values(reached, "energy"))[0] if reached else math.nan
            if energy > 0:
                points.append((theta, energy))
        if points:
            ax.plot(
                [t for t, _ in points],
                [e for _, e in points],
                marker="o",
                label=f"tau={tau:g}, c={c:g}",
            )
            plotted = True
    ax.set_xlabel("consolidation threshold theta")
    ax.set_ylabel("energy to the target (runs that reached it)")
    ax.grid(True, alpha=0.3)
    if not plotted:
        ax.text(0.5, 0.5, "no run reached the target", ha="center", transform=ax.transAxes)
        return
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


EXPERIMENTS = (CachingSweep,)
