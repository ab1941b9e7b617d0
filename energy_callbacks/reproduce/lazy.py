"""``lazy``: lazy learning against backprop, each at its own best learning rate.

Lazy learning (SCIENCE.md section 2c) learns only from the samples the network gets
wrong and skips the backward pass of the others (``skip_backward=True``). Its claim
is speed, so the comparison has to be fair to both rules: each at the learning rate
that suits it, chosen without the test set, at several batch sizes, to the target
and to a higher target both can reach. Cross-entropy, the paper MLP, plain SGD,
batches drawn with replacement, a test every 2000 samples. One sweep in three
stages; a rerun resumes:

1. ``lr``: every rule x batch size x learning rate of the grid, seed 0, trained on
   the training set less a validation split (10 000 samples) and tested on that
   split. A rule's rate at a batch size is the one that sustains the target on the
   validation split after the fewest samples (if none does: the best final
   validation accuracy).
2. ``test``: every rule x batch size at its chosen rate, every seed, on the whole
   training set, tested on the test set until it sustains the high target or the
   budget ends: training time, samples and backward passes to both targets.
3. ``fraction``: the same at one batch size on 10%, 25% and 50% of the training set
   (the papers' "suits large data sets"; 100% is the ``test`` stage).

Times are training wall-clock seconds with the tests excluded; a backward pass is
one sample through the backward pass (every sample for backprop, the mistakes for
lazy learning).
"""

from __future__ import annotations

import math
from typing import Any

from .base import Experiment
from .paper import SUSTAINED_POINTS, Curve
from .report import Summary, cell, fmt, group, markdown, mean_sd, ratio, seeds_phrase, values
from .rules import get_rule
from .runner import COLUMNS, RunResult, RunSpec, Sweep

LAZY_COLUMNS = (
    *COLUMNS,
    "stage",
    "batch_size",
    "lr",
    "fraction",
    "high_target",
    "seconds_sustained",
    "backward_sustained",
    "samples_high",
    "seconds_high",
    "backward_high",
)
COMPARED = ("backprop", "lazy")
FULL: dict[str, Any] = dict(
    lrs=(0.01, 0.03, 0.1, 0.3),
    batches=(1, 32, 128),
    fractions=(0.1, 0.25, 0.5),
    fraction_batch=32,
    validation=10_000,
    high=0.88,
    max_samples=300_000,
)
QUICK: dict[str, Any] = dict(
    lrs=(0.01, 0.1),
    batches=(1, 16),
    fractions=(0.5,),
    fraction_batch=16,
    validation=1000,
    high=0.75,
    max_samples=3000,
)


def _numbers(text: str, name: str, kind: type = float) -> tuple[Any, ...]:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"--{name} takes positive numbers, got {text!r}")
    return values


def choose_lr(rows: list[dict[str, Any]], rule: str, batch: int, lrs: tuple[float, ...]) -> float:
    """The learning rate of ``rule`` at ``batch`` from the ``lr`` stage's rows: the one
    that sustained the target on the validation split after the fewest samples (ties:
    the better final validation accuracy; none reaching: the best final accuracy)."""
    tried = [
        r
        for r in rows
        if r["stage"] == "lr" and r["rule"] == rule and r["batch_size"] == batch and r["lr"] in lrs
    ]
    if len({r["lr"] for r in tried}) < len(lrs):
        raise RuntimeError(
            f"lazy: the learning-rate stage of {rule} at batch {batch} is unfinished; "
            "rerun the same command to finish it first"
        )
    reached = [r for r in tried if r["samples_sustained"] != ""]
    if reached:
        best = min(reached, key=lambda r: (r["samples_sustained"], -r["accuracy"]))
    else:
        best = max(tried, key=lambda r: r["accuracy"])
    return float(best["lr"])


class Lazy(Experiment):
    """Lazy learning against backprop, each at its own learning rate (see the module)."""

    name = "lazy"
    help = "lazy learning vs backprop at their own learning rates: time to two targets"
    columns = LAZY_COLUMNS

    def settings(self) -> dict[str, Any]:
        """The grid of this run: defaults for full or quick runs, with the overrides."""
        s = dict(QUICK if self.config.quick else FULL)
        extra = self.config.extra
        if "lrs" in extra:
            s["lrs"] = _numbers(extra["lrs"], "lrs")
        if "batch_sizes" in extra:
            s["batches"] = _numbers(extra["batch_sizes"], "batch-sizes", int)
            # the fraction stage keeps batch 32 when the sweep has it (the full grid's)
            b = s["batches"]
            fb = FULL["fraction_batch"]
            s["fraction_batch"] = fb if fb in b else b[min(1, len(b) - 1)]
        if "fractions" in extra:
            s["fractions"] = tuple(f for f in _numbers(extra["fractions"], "fractions") if f < 1)
            if any(f > 1 for f in s["fractions"]):
                raise ValueError("--fractions are shares of the training set, in (0, 1]")
        if s["high"] <= self.config.accuracy_target:
            s["high"] = min(1.0, self.config.accuracy_target + 0.03)
        return s

    def size(self) -> int:
        return (self.config.sizes or ((60,) if self.config.quick else (1000,)))[0]

    def budget(self) -> tuple[int, int]:
        return (
            self.config.pick("max_samples", FULL["max_samples"], QUICK["max_samples"]),
            self.config.pick("eval_every", 2000, 500),
        )

    def specs(self) -> list[RunSpec]:
        s = self.settings()
        max_samples, every = self.budget()
        n = self.size()
        grid = ",".join(f"{lr:g}" for lr in s["lrs"])
        common = dict(N=n, max=max_samples, every=every)
        specs = []
        for rule in COMPARED:
            for b in s["batches"]:
                for lr in s["lrs"]:
                    key = self.key(stage="lr", rule=rule, batch=b, lr=lr, **common, seed=0)
                    params = dict(stage="lr", rule=rule, batch=b, lr=lr, fraction=1.0)
                    specs.append(RunSpec(key, f"lr {rule} b={b} lr={lr:g}", params))
        stages = [("test", b, 1.0) for b in s["batches"]]
        stages += [("fraction", s["fraction_batch"], f) for f in s["fractions"]]
        for stage, b, f in stages:
            for rule in COMPARED:
                for seed in range(self.config.seeds):
                    key = self.key(
                        stage=stage, rule=rule, batch=b, fraction=f, lrs=grid, **common, seed=seed
                    )
                    params = dict(stage=stage, rule=rule, batch=b, fraction=f, seed=seed)
                    specs.append(RunSpec(key, f"{stage} {rule} b={b} {f:.0%} seed {seed}", params))
        for spec in specs:
            spec.params.update(n_hidden=n, seed=spec.params.get("seed", 0))
        return specs

    def execute(self, spec: RunSpec) -> RunResult:
        p, s = spec.params, self.settings()
        max_samples, every = self.budget()
        if p["stage"] == "lr":
            lr, data = p["lr"], self.data.validation(s["validation"])
        else:
            rows = Sweep(self.config.out, self.name, self.columns).rows()
            prefix = spec.key.split("|stage=")[0] + "|"
            lr = choose_lr(
                [r for r in rows if str(r["key"]).startswith(prefix)],
                p["rule"],
                p["batch"],
                s["lrs"],
            )
            data = self.data
            if p["fraction"] < 1:
                data = data.subset(round(p["fraction"] * len(data.x_train)), None, seed=0)
        rule = get_rule(p["rule"])
        run = self.fit(
            rule.build(p["n_hidden"], p["seed"]),
            p["n_hidden"],
            p["seed"],
            data=data,
            lr=lr,
            loss="cross_entropy",
            max_samples=max_samples,
            eval_every=every,
            target=s["high"],
            confirm=SUSTAINED_POINTS,
            batch_size=p["batch"],
            skip_backward=rule.name == "lazy",
            checkpoint=spec.checkpoint,
        )
        row = self.row(p, run, rule.name, rule.label, "cross_entropy", max_samples, data=data)
        c = run.curve
        at, high = c.first_sustained(self.config.accuracy_target), c.first_sustained(s["high"])
        row.update(
            stage=p["stage"],
            batch_size=p["batch"],
            lr=lr,
            fraction=p["fraction"],
            high_target=s["high"],
            seconds_sustained="" if at is None else c.seconds[at],
            backward_sustained="" if at is None else c.learned[at],
            samples_high="" if high is None else c.samples[high],
            seconds_high="" if high is None else c.seconds[high],
            backward_high="" if high is None else c.learned[high],
        )
        return RunResult(row, c)

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        s = self.settings()
        test = [r for r in rows if r["stage"] == "test"]
        text = f"# lazy ({_setup(rows, s)})\n\n"
        text += "## Learning rates, chosen on the validation split\n\n" + _lr_table(rows, s)
        if test:
            text += "\n## At the chosen rates, on the test set\n\n" + _test_table(test)
            text += "\n" + _speedups(test, "batch_size")
        else:
            text += "\nThe test stage has not run yet.\n"
        for b in sorted({r["batch_size"] for r in rows if r["stage"] == "fraction"}):
            shares = [
                r for r in rows if r["stage"] in ("fraction", "test") and r["batch_size"] == b
            ]
            text += f"\n## Smaller training sets (batch {b})\n\n" + _speedups(shares, "fraction")
        shown = test or [r for r in rows if r["stage"] == "lr"]  # until the race has run
        return Summary(text, lambda fig: _plot(fig, shown, curves))


def _setup(rows: list[dict[str, Any]], s: dict[str, Any]) -> str:
    if not rows:
        return "no runs"
    r = rows[0]
    test = [x for x in rows if x["stage"] == "test"] or rows
    return (
        f"{str(r['dataset']).replace(' (validation split)', '')}, N = {r['n_hidden']}, "
        f"cross-entropy, SGD, targets {r['target']:.0%} and {r['high_target']:.0%}, "
        f"budget {r['max_samples']} samples, {seeds_phrase(test)}"
    )


def _lr_table(rows: list[dict[str, Any]], s: dict[str, Any]) -> str:
    tried = [r for r in rows if r["stage"] == "lr"]
    body = []
    for (rule, b), g in group(tried, "rule", "batch_size").items():
        try:
            chosen = choose_lr(tried, rule, b, tuple(sorted({r["lr"] for r in g})))
        except RuntimeError:
            chosen = math.nan
        for r in sorted(g, key=lambda r: r["lr"]):
            body.append(
                [
                    rule,
                    str(b),
                    f"{r['lr']:g}" + (" (chosen)" if r["lr"] == chosen else ""),
                    fmt(r["samples_sustained"]) if r["samples_sustained"] != "" else "-",
                    f"{r['accuracy']:.3f}",
                ]
            )
    header = ["rule", "batch", "lr", "samples to the target (validation)", "final validation acc"]
    return markdown(header, body)


def _test_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for (b, rule), g in sorted(group(rows, "batch_size", "rule").items()):
        body.append(
            [
                str(b),
                rule,
                f"{g[0]['lr']:g}",
                f"{sum(r['seconds_sustained'] != '' for r in g)}/{len(g)}",
                cell(g, "seconds_sustained"),
                cell(g, "samples_sustained"),
                cell(g, "backward_sustained"),
                f"{sum(r['seconds_high'] != '' for r in g)}/{len(g)}",
                cell(g, "seconds_high"),
                cell(g, "backward_high"),
                f"{mean_sd(values(g, 'samples_learned'))[0]:.0%}",
            ]
        )
    header = [
        "batch",
        "rule",
        "lr",
        "sustained target",
        "time to target (s)",
        "samples",
        "backward passes",
        "sustained high",
        "time to high (s)",
        "backward passes",
        "learned",
    ]
    return markdown(header, body) + (
        "\nAt the sustained crossing of each target (mean ± sd over seeds; '-' where a run "
        "did not sustain it).\n"
    )


def _speedups(rows: list[dict[str, Any]], by: str) -> str:
    """Backprop's time over lazy learning's, per ``by`` value, paired by seed."""
    body = []
    for (value,), g in sorted(group(rows, by).items()):
        base = {r["seed"]: r for r in g if r["rule"] == "backprop"}
        lazy = [r for r in g if r["rule"] == "lazy" and r["seed"] in base]
        if not lazy:
            continue
        cells = []
        for column in ("seconds_sustained", "seconds_high", "backward_sustained"):
            xs = [
                ratio(float(base[r["seed"]][column]), float(r[column]))
                for r in lazy
                if r[column] != "" and base[r["seed"]][column] != ""
            ]
            m, sd = mean_sd(xs)
            ok = len(xs) == len(lazy)
            cells.append(
                "-" if not ok else f"{fmt(m)}x" + (f" ± {fmt(sd, 2)}" if len(xs) > 1 else "")
            )
        label = f"{value:.0%}" if by == "fraction" else str(value)
        reached = sum(r["seconds_sustained"] != "" for r in lazy)
        body.append([label, str(len(lazy)), f"{reached}/{len(lazy)}", *cells])
    if not body:
        return ""
    name = "training set" if by == "fraction" else "batch"
    header = [
        name,
        "seeds",
        "lazy sustains target",
        "time to target",
        "time to high",
        "backward passes to target",
    ]
    return (
        "Backprop over lazy learning, same seed (above 1x: lazy learning is faster):\n\n"
        + markdown(header, body)
    )


def _plot(figure: Any, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> None:
    """Accuracy against training time per batch size: the test stage's runs, or the
    learning-rate stage's on the validation split while the race has not run."""
    batches = sorted({r["batch_size"] for r in rows}) or [1]
    validation = any(r["stage"] == "lr" for r in rows)
    axes = figure.subplots(1, len(batches), squeeze=False)[0]
    for ax, b in zip(axes, batches, strict=True):
        for r in rows:
            c = curves.get(r["key"])
            if c is None or r["batch_size"] != b:
                continue
            style = "-" if r["rule"] == "backprop" else "--"
            label = f"{r['rule']} lr {r['lr']:g}" if validation else f"{r['rule']} s{r['seed']}"
            ax.plot(c.seconds, c.accuracy, style, label=label)
        if rows:
            for level in (rows[0]["target"], rows[0]["high_target"]):
                ax.axhline(level, color="grey", linestyle=":")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("training time (s, tests excluded)")
        ax.set_ylabel("validation accuracy" if validation else "test accuracy")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)


EXPERIMENTS = (Lazy,)

__all__ = ["LAZY_COLUMNS", "Lazy", "choose_lr"]
