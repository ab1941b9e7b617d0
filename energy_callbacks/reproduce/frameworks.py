"""``frameworks``: the same small configuration through Lightning and through Keras.

The paper MLP (MSE loss, SGD lr 0.01, batch 1) trains on one fixed sequence of
samples (drawn with replacement from the seed), from the same initial weights,
under each rule, once with :class:`energy_callbacks.lightning.PlasticityCallback`
and once with :class:`energy_callbacks.keras.PlasticityCallback` on the
TensorFlow backend. Keras runs in a subprocess with ``KERAS_BACKEND=tensorflow``,
so the backend is right whatever this process imported. The energies should
agree within 5%: both measure the real float32 weight change, and only the two
frameworks' float32 kernels differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .base import Experiment, paper_run
from .keras_run import IMPORT_ERROR_STATUS
from .paper import Curve
from .report import Summary, fmt, group, markdown, ratio
from .rules import RULES
from .runner import RunResult, RunSpec

FRAMEWORK_RULES = ("backprop", "top-fraction", "top-units-path", "lazy")
TOLERANCE = 0.05
KERAS_TIMEOUT_S = 1800


class KerasUnavailable(RuntimeError):
    """The Keras adapter cannot be imported (the ``frameworks`` experiment needs it)."""


def keras_environment() -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def check_keras() -> None:
    """Raise :class:`KerasUnavailable` unless ``energy_callbacks.keras`` imports on TensorFlow."""
    probe = subprocess.run(
        [sys.executable, "-c", "import energy_callbacks.keras"],
        env=keras_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise KerasUnavailable(
            "reproduce frameworks needs the Keras adapter energy_callbacks.keras, which does not "
            f"import with KERAS_BACKEND=tensorflow: {last}. Install the keras extra "
            "(pip install -e '.[keras]'); if energy_callbacks/keras/ is missing, this "
            "release has no Keras adapter yet: run the other experiments."
        )


def draw_order(n_pool: int, n_samples: int, seed: int) -> np.ndarray:
    """The sample ids :class:`~energy_callbacks.reproduce.paper.SampleStream` draws at batch 1."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, n_pool, 1) for _ in range(n_samples)])


class Frameworks(Experiment):
    """Lightning against Keras (TensorFlow) on one small configuration."""

    name = "frameworks"
    help = "the same small configuration through Lightning and Keras (TF backend)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keras_rows: dict[tuple[str, int], dict[str, Any]] = {}

    def preflight(self) -> None:
        super().preflight()
        if self.config.output_lr != "same":
            raise ValueError(
                "frameworks compares one step size in both layers through Lightning and "
                "Keras; drop --output-lr"
            )
        check_keras()

    def settings(self) -> tuple[int, int]:
        n = (self.config.sizes or ((30,) if self.config.quick else (100,)))[0]
        return n, self.config.pick("max_samples", 3000, 600)

    def rules(self) -> tuple[str, ...]:
        return self.config.rules or FRAMEWORK_RULES

    def specs(self) -> list[RunSpec]:
        n, samples = self.settings()
        return [
            RunSpec(
                self.key(framework=fw, N=n, rule=r, seed=s, samples=samples),
                f"{fw} {r} seed {s}",
                dict(framework=fw, n_hidden=n, rule=r, seed=s),
            )
            for s in range(self.config.seeds)
            for fw in ("lightning", "keras")
            for r in self.rules()
        ]

    def execute(self, spec: RunSpec) -> RunResult:
        _, samples = self.settings()
        if spec.params["framework"] == "lightning":
            result = paper_run(self, spec, target=None, max_samples=samples, eval_every=samples)
            result.row["framework"] = "lightning"
            return result
        seed = spec.params["seed"]
        if (spec.params["rule"], seed) not in self._keras_rows:
            self._run_keras(spec.params["n_hidden"], samples, seed)
        return RunResult(self._keras_rows[(spec.params["rule"], seed)])

    def _run_keras(self, n_hidden: int, samples: int, seed: int) -> None:
        """All rules of one seed in one Keras process (TensorFlow starts once)."""
        data = self.data
        order = draw_order(len(data.x_train), samples, seed)
        with tempfile.TemporaryDirectory() as tmp:
            source, target = Path(tmp) / "in.npz", Path(tmp) / "out.json"
            np.savez(
                source,
                x=data.x_train[order],
                y=data.y_train[order].astype(np.int32),  # Keras' usual label dtype
                x_test=data.x_test,
                y_test=data.y_test.astype(np.int32),
                n_hidden=n_hidden,
                n_outputs=data.n_classes,
                seed=seed,
                lr=0.01,
                rules=np.array(self.rules()),
            )
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "energy_callbacks.reproduce.keras_run",
                    str(source),
                    str(target),
                ],
                env=keras_environment(),
                capture_output=True,
                text=True,
                check=False,
                timeout=KERAS_TIMEOUT_S,
            )
            answer = json.loads(target.read_text()) if target.exists() else {}
        if child.returncode == IMPORT_ERROR_STATUS:
            raise KerasUnavailable(f"energy_callbacks.keras does not import: {answer['error']}")
        if child.returncode != 0:
            raise RuntimeError(
                f"the Keras run failed (exit {child.returncode}):\n"
                f"{answer.get('error') or child.stderr[-4000:]}"
            )
        for r in answer["results"]:
            rule = RULES[r["rule"]]
            self._keras_rows[(rule.name, seed)] = {
                "dataset": data.name,
                "framework": "keras",
                "rule": rule.name,
                "label": rule.label,
                "n_hidden": n_hidden,
                "seed": seed,
                "loss": "mse",
                "target": "",
                "max_samples": samples,
                "samples": samples,
                "epochs": samples / len(data.x_train),
                "accuracy": r["accuracy"],
                "m1": r["m1"],
                "m0": r["m0"],
                "m1_min": r["m1_min"],
                "m0_min": r["m0_min"],
                "inefficiency": r["inefficiency"],
                "samples_learned": r["samples_learned"],
                "train_seconds": r["seconds"],
                "seconds": r["seconds"],
            }

    def summarize(self, rows: list[dict[str, Any]], curves: dict[str, Curve]) -> Summary:
        text = f"# frameworks ({_setup(rows)})\n\n" + comparison_table(rows)
        return Summary(text, lambda fig: _plot(fig, rows))


def _setup(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs"
    r = rows[0]
    return (
        f"{r['dataset']}, MLP N = {r['n_hidden']}, MSE, SGD lr 0.01, batch 1, "
        f"the same {r['max_samples']} samples and initial weights in both frameworks"
    )


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Per rule and seed: Lightning vs Keras M1, M0, accuracy, and whether M1 agrees to 5%."""
    body = []
    for (rule, seed), g in group(rows, "rule", "seed").items():
        by = {r["framework"]: r for r in g}
        if set(by) != {"lightning", "keras"}:
            continue
        lt, ks = by["lightning"], by["keras"]
        d1 = ratio(ks["m1"], lt["m1"]) - 1
        d0 = ratio(ks["m0"], lt["m0"]) - 1
        body.append(
            [
                RULES[rule].label,
                str(seed),
                fmt(lt["m1"], 4),
                fmt(ks["m1"], 4),
                f"{d1:+.2%}",
                fmt(lt["m0"], 4),
                fmt(ks["m0"], 4),
                f"{d0:+.2%}",
                f"{lt['accuracy']:.3f} / {ks['accuracy']:.3f}",
                "yes" if abs(d1) <= TOLERANCE and abs(d0) <= TOLERANCE else "no",
            ]
        )
    header = [
        "rule",
        "seed",
        "M1 Lightning",
        "M1 Keras",
        "diff",
        "M0 Lightning",
        "M0 Keras",
        "diff",
        "test acc (L / K)",
        "within 5%",
    ]
    return markdown(header, body)


def _plot(figure: Any, rows: list[dict[str, Any]]) -> None:
    axes = figure.subplots(1, 2)
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    x = np.arange(len(rules))
    for ax, column in zip(axes, ("m1", "m0"), strict=True):
        for offset, fw in ((-0.2, "lightning"), (0.2, "keras")):
            ys = [
                np.mean(
                    [r[column] for r in rows if r["rule"] == rule and r["framework"] == fw]
                    or [np.nan]
                )
                for rule in rules
            ]
            ax.bar(x + offset, ys, width=0.4, label=fw)
        ax.set_xticks(x, rules, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(column.upper())
        ax.legend()


EXPERIMENTS = (Frameworks,)
