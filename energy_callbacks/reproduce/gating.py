"""``mistakes``: memorized mistake gating against lazy learning and backprop.

It trains the one-hidden-layer MLP of the reference experiment with a
cross-entropy loss (the gating papers' choice), SGD lr 0.01, batch 1, samples
with replacement, for a fixed budget of samples, testing every 2000 samples.

- Setting ``plain``: accuracy against training time and against the number of
  synaptic updates, for backprop, lazy and memorized mistakes; the updates each
  gated rule saves at equal accuracy, level by level.
- Setting ``incremental``: the first half of the classes (0-4) for one budget,
  then all classes for another (the new classes plus a replay of the old
  ones). Forgetting is the drop in accuracy on the old classes' test
  samples during the second phase. The replay buffer is what the second phase
  must keep of the first phase's samples: all of them for backprop and lazy,
  only the flagged ones for memorized mistakes. The rule ``mistakes`` replays
  everything (the flagged count is what it would need); ``mistakes-replay``
  really replays only the flagged samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..lightning import PlasticityCallback
from .base import Experiment, paper_run
from .paper import Curve, Pool
from .report import Summary, cell, fmt, group, markdown, mean_sd, ratio, seeds_phrase, values
from .rules import RULES, get_rule
from .runner import RunResult, RunSpec


class _Gating(Experiment):
    rules: tuple[str, ...] = ()

    def size(self) -> int:
        return (self.config.sizes or ((60,) if self.config.quick else (1000,)))[0]

    def budget(self) -> tuple[int, int]:
        return (
            self.config.pick("max_samples", 120_000, 3000),
            self.config.pick("eval_every", 2000, 500),
        )

    def run_plain(self, spec: RunSpec) -> RunResult:
        max_samples, eval_every = self.budget()
        result = paper_run(
            self,
            spec,
            loss="cross_entropy",
            target=None,
            max_samples=max_samples,
            eval_every=eval_every,
        )
        result.row["setting"] = "plain"
        return result


MISTAKES_RULES = ("backprop", "lazy", "mistakes", "mistakes-replay")


class Mistakes(_Gating):
    """Memorized mistake gating against lazy and backprop, plain and class-incremental."""

    name = "mistakes"
    help = "memorized mistakes vs lazy vs backprop, plain and class-incremental"

    def specs(self) -> list[RunSpec]:
        max_samples, every = self.budget()
        n = self.size()
        chosen = self.config.rules or MISTAKES_RULES
        unknown = sorted(set(chosen) - set(MISTAKES_RULES))
        if unknown:
            raise ValueError(
                f"mistakes runs the rules {', '.join(MISTAKES_RULES)}; --rules has {unknown}"
            )
        specs = []
        for setting, rules in (
            ("plain", ("backprop", "lazy", "mistakes")),
            ("incremental", MISTAKES_RULES),
        ):
            for r in [r for r in rules if r in chosen]:
                for s in range(self.config.seeds):
                    key = self.key(
                        setting=setting, N=n, rule=r, seed=s, max=max_samples, every=every
                    )
                    params = dict(n_hidden=n, rule=r, seed=s, setting=setting)
                    specs.append(RunSpec(key, f"{setting} {r} seed {s}", params))
        return specs

    def execute(self, spec: RunSpec) -> RunResult:
        if spec.params["setting"] == "plain":
            return self.run_plain(spec)
        return self.run_incremental(spec)

    def run_incremental(self, spec: RunSpec) -> RunResult:
        p, data = spec.params, self.data
        max_samples, eval_every = self.budget()
        half = data.n_classes // 2
        old = np.flatnonzero(data.y_train < half)
        new = np.flatnonzero(data.y_train >= half)
        flagged_only = p["rule"] == "mistakes-replay"

        def second_phase(energy: PlasticityCallback) -> Pool:
            memory = getattr(energy.plasticity.samples, "memory", None)
            if memory is None:
                return np.arange(len(data.y_train))
            ids = memory.flagged()
            note = {"flagged_old": int(np.isin(ids, old).sum())}
            if flagged_only:
                return np.union1d(new, np.intersect1d(ids, old)), note
            return np.arange(len(data.y_train)), note

        rule = get_rule("mistakes" if flagged_only else p["rule"])
        run = self.fit(
            rule.build(p["n_hidden"], p["seed"]),
            p["n_hidden"],
            p["seed"],
            loss="cross_entropy",
            max_samples=max_samples // 2,
            eval_every=eval_every,
            target=None,
            phases=[old, second_phase],
            subsets={"old": data.y_test < half},
            checkpoint=spec.checkpoint,
        )
        old_acc = run.tester.subset_accuracy["old"]
        after_first = old_acc[run.phase_ends[0]]
        label = "memorized mistakes, replay of flagged samples only" if flagged_only else rule.label
        row = {
            **self.row(p, run, p["rule"], label, "cross_entropy", max_samples),
            "setting": "incremental",
            "accuracy_old_after_first": after_first,
            "accuracy_old": old_acc[-1],
            "forgetting": after_first - old_acc[-1],
            "replay_buffer": run.notes[1].get("flagged_old", len(old)),
        }
        return RunResult(row, run.curve)

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        plain = [r for r in rows if r["setting"] == "plain"]
        incremental = [r for r in rows if r["setting"] == "incremental"]
        text = f"# mistakes ({_setup(rows)})\n\n## Setting 1: plain training\n\n"
        text += _to_target_table(plain) + "\n"
        text += _speedup(plain, "mistakes", "m0_to_target", "updates (M0)")
        text += "\n" + updates_along_the_curve(plain, curves)
        text += "\n## Setting 2: class-incremental (first half of the classes, then all)\n\n"
        text += _incremental_table(incremental)
        return Summary(text, lambda fig: _plot_curves(fig, plain, curves))


def _label(rule: str) -> str:
    if rule == "mistakes-replay":
        return "memorized mistakes, flagged replay"
    return RULES[rule].label if rule in RULES else rule


def _setup(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    r = rows[0]
    return (
        f"{r['dataset']}, N = {r['n_hidden']}, cross-entropy, budget {r['max_samples']} "
        f"samples, target {r['target']:.0%}, {seeds_phrase(rows)}"
    )


def _to_target_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "rule",
        "reached",
        "time to target (s)",
        "samples to target",
        "M0 to target",
        "M1 to target",
        "final acc",
        "train time (s)",
        "M1",
        "M0",
        "learned",
    ]
    body = [
        [
            _label(rule),
            f"{sum(r['samples_to_target'] != '' for r in g)}/{len(g)}",
            cell(g, "seconds_to_target"),
            cell(g, "samples_to_target"),
            cell(g, "m0_to_target"),
            cell(g, "m1_to_target"),
            cell(g, "accuracy"),
            cell(g, "train_seconds"),
            cell(g, "m1"),
            cell(g, "m0"),
            f"{mean_sd(values(g, 'samples_learned'))[0]:.0%}",
        ]
        for (rule,), g in group(rows, "rule").items()
    ]
    return markdown(header, body)


def _speedup(rows: list[dict[str, Any]], rule: str, column: str, what: str) -> str:
    by = {k[0]: mean_sd(values(g, column))[0] for k, g in group(rows, "rule").items()}
    acc = {k[0]: mean_sd(values(g, "accuracy"))[0] for k, g in group(rows, "rule").items()}
    if "backprop" not in by or rule not in by:
        return ""
    x = ratio(by["backprop"], by[rule])
    final = f"Final accuracy {acc[rule]:.3f} vs backprop {acc['backprop']:.3f}."
    if x != x:  # NaN: a rule never reached the target
        return f"{rule}: {what} to the target not measurable: not every run reached it. {final}\n"
    return f"{rule}: backprop needs {fmt(x)}x the {what} to the target. {final}\n"


def levels(target: float) -> tuple[float, ...]:
    """The accuracy levels at which gated rules' updates are compared: the target ± 5
    points, every 0.5 (80% to 90% for a target of 85%)."""
    return tuple(round(target - 0.05 + 0.005 * i, 3) for i in range(21))


def fewer_updates(
    rows: list[dict[str, Any]], curves: dict[str, Curve], rule: str
) -> dict[float, list[float]]:
    """Per accuracy level that every run of ``rule`` and backprop sustains, the share of
    updates (M0) ``rule`` saves against backprop of the same seed, one entry per seed.

    M0 is read at the first of two consecutive test points at or above the level, so a
    lucky test point cannot decide it."""
    runs = {(r["rule"], int(r["seed"])): curves[r["key"]] for r in rows if r["key"] in curves}
    seeds = sorted(s for (name, s) in runs if name == rule and ("backprop", s) in runs)
    out: dict[float, list[float]] = {}
    for level in levels(float(rows[0]["target"])) if rows else ():
        shares = []
        for seed in seeds:
            at = [runs[name, seed].first_sustained(level) for name in ("backprop", rule)]
            if None in at:
                break
            b, g = (runs[n, seed].m0[i] for n, i in zip(("backprop", rule), at, strict=True))
            shares.append(1 - g / b)
        if seeds and len(shares) == len(seeds):
            out[level] = shares
    return out


def updates_along_the_curve(rows: list[dict[str, Any]], curves: dict[str, Curve]) -> str:
    """The table of :func:`fewer_updates` for every gated rule, level by level."""
    rules = [k[0] for k in group(rows, "rule") if k[0] != "backprop"]
    if not rules:
        return ""
    saved = {rule: fewer_updates(rows, curves, rule) for rule in rules}
    levels = sorted({level for s in saved.values() for level in s})
    if not levels:
        return "No accuracy level within 5 points of the target is sustained by every run.\n"
    body = []
    for level in levels:
        cells = []
        for rule in rules:
            xs = saved[rule].get(level)
            m, sd = mean_sd([100 * x for x in xs]) if xs else (math.nan, math.nan)
            cells.append("-" if not xs else f"{m:.0f} ± {sd:.0f}%" if len(xs) > 1 else f"{m:.0f}%")
        body.append([f"{level:.1%}", *cells])
    header = ["accuracy", *(f"{_label(r)}: fewer updates" for r in rules)]
    return (
        "Updates saved against backprop of the same seed, at each accuracy level every run "
        "sustains (two consecutive test points at or above it; mean ± sd over seeds):\n\n"
        + markdown(header, body)
    )


def _incremental_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "rule",
        "acc (all)",
        "old classes after phase 1",
        "old classes at end",
        "forgetting",
        "M0",
        "M1",
        "learned",
        "replay buffer",
    ]
    body = [
        [
            _label(rule),
            cell(g, "accuracy"),
            cell(g, "accuracy_old_after_first"),
            cell(g, "accuracy_old"),
            cell(g, "forgetting"),
            cell(g, "m0"),
            cell(g, "m1"),
            f"{mean_sd(values(g, 'samples_learned'))[0]:.0%}",
            cell(g, "replay_buffer"),
        ]
        for (rule,), g in group(rows, "rule").items()
    ]
    return markdown(header, body)


def _plot_curves(figure: Any, rows: list[dict[str, Any]], curves: dict[str, Any]) -> None:
    axes = figure.subplots(1, 2)
    for r in rows:
        c = curves.get(r["key"])
        if c is None:
            continue
        label = f"{r['rule']} s{r['seed']}"
        axes[0].plot(c.seconds, c.accuracy, marker=".", label=label)
        axes[1].plot([max(m, 1) for m in c.m0], c.accuracy, marker=".", label=label)
    axes[0].set_xlabel("training wall-clock time (s, tests excluded)")
    axes[1].set_xlabel("synaptic updates M0")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(True, alpha=0.3)
        if rows:
            ax.axhline(rows[0]["target"], color="grey", linestyle=":")
    axes[0].legend(fontsize=7)


EXPERIMENTS = (Mistakes,)
