"""``energy-callbacks demo``: the same network, three rules, two frameworks, one table.

It trains a small MLP on scikit-learn's bundled digits with plain backprop, the
combined rule (the authors' form: a fixed path, then its largest updates) and
lazy learning, through PyTorch Lightning and, when Keras is installed, through
Keras 3 on its configured backend. It shows a progress bar per run, prints a
table (accuracy, M1, M0, M1_min, inefficiency, the saving against backprop),
and saves a plot of accuracy against the energy spent, read back from the
runs' ``CSVLogger`` files.

Settings that cannot work raise :class:`DemoConfigError` (or FileNotFoundError /
IDXError for the data) before any training, so the command line can report them
in one line.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from ..core import Plasticity
from ..reproduce.rules import RULES
from .config import DEFAULT_RULES, DemoConfig, DemoConfigError, DemoData, load_data
from .result import RunResult
from .summary import legend, results_table, save_plot

__all__ = ["DEFAULT_RULES", "DemoConfig", "DemoConfigError", "RunResult", "run_demo"]

Runner = Callable[[DemoConfig, DemoData, str, Plasticity, Callable[[], None]], RunResult]


def _runners(config: DemoConfig, console: Console) -> dict[str, Runner]:
    """The frameworks to train with, imported now so that a missing one fails early."""
    wanted = config.frameworks
    runners: dict[str, Runner] = {}
    if wanted is None or "lightning" in wanted:
        from .lightning_run import run_lightning

        runners["lightning"] = run_lightning
    if wanted is None and importlib.util.find_spec("keras") is None:
        console.print(
            "Keras is not installed: Lightning only (pip install 'energy-callbacks[keras]')"
        )
    elif wanted is None or "keras" in wanted:
        try:
            from .keras_run import run_keras
        except ImportError as exc:
            if wanted is not None:
                raise DemoConfigError(
                    f"--frameworks keras: the Keras adapter cannot be imported ({exc}); "
                    "pip install 'energy-callbacks[keras]'"
                ) from exc
            console.print(f"Keras cannot be imported ({exc}): Lightning only")
        else:
            runners["keras"] = run_keras
    return runners


def _plan(config: DemoConfig, runners: dict[str, Runner], console: Console) -> list[tuple]:
    """``(framework, runner, rule)`` for every run; rules a framework refuses are noted."""
    plan = []
    for framework, runner in runners.items():
        for rule in config.rules:
            if framework == "keras":
                from .keras_run import check_rule

                try:
                    check_rule(RULES[rule].build(config.hidden, config.seed))
                except ValueError as exc:
                    console.print(f"keras: skipping {rule}: {exc}")
                    continue
            plan.append((framework, runner, rule))
    return plan


def run_demo(config: DemoConfig, console: Console | None = None) -> list[RunResult]:
    """Train every (framework, rule) pair, print the table, save the plot; the results."""
    console = console or Console()
    data = load_data(config)
    runners = _runners(config, console)
    plan = _plan(config, runners, console)
    n_in, n_out = data.x_train.shape[1], data.n_classes
    setting = (
        f"MLP {n_in}-{config.hidden}-{n_out} (ReLU, cross-entropy), SGD lr {config.lr}, "
        f"batch {config.batch_size}, {config.epochs} epochs"
    )
    console.print(
        f"[bold]{data.name}[/]: {len(data.y_train)} train / {len(data.y_test)} test samples; "
        f"{setting}; seed {config.seed}"
    )
    batches = -(-len(data.y_train) // config.batch_size)
    results = []
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "batches",
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        for framework, runner, rule in plan:
            task = progress.add_task(f"{framework:<17} {rule}", total=config.epochs * batches)
            plasticity = RULES[rule].build(config.hidden, config.seed)
            results.append(
                runner(config, data, rule, plasticity, lambda t=task: progress.advance(t))
            )
    title = f"Plasticity energy after {config.epochs} epochs on {data.name}"
    console.print(results_table(results, title))
    console.print(legend([r.rule for r in results]))
    plot = save_plot(results, Path(config.out) / "demo.png", f"{data.name}: {setting}")
    logs = " ".join(str(r.log) for r in results)
    console.print(f"Plot saved to [bold]{plot}[/]")
    console.print(f"CSV logs: {logs}")
    console.print(f"Redraw it: energy-callbacks plot {logs} --out {plot}")
    return results
