"""Command line: ``energy-callbacks demo | plot | reproduce``.

``demo`` trains a small MLP on the bundled digits with backprop and energy-saving
rules, through PyTorch Lightning and Keras, prints the energy each spent and
saves a plot (see :mod:`energy_callbacks.demo`).

``plot FILE...`` turns Lightning or Keras ``CSVLogger`` files into the same plot
of accuracy against energy (:mod:`energy_callbacks.plot`).

``reproduce EXPERIMENT`` reruns one of the papers' experiments through the
framework callbacks and writes a CSV, a markdown table and a PNG plot
(see :mod:`energy_callbacks.reproduce` and docs/reproduce.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from .data import IDXError
    from .demo import DemoConfig, DemoConfigError, run_demo

    console = Console() if sys.stdout.isatty() else Console(width=150)
    try:
        config = DemoConfig(
            rules=_names(args.rules),
            frameworks=_names(args.frameworks) if args.frameworks else None,
            hidden=args.hidden,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            dataset=args.dataset,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            train_samples=args.train_samples,
            out=Path(args.out),
        )
        run_demo(config, console)
    except (DemoConfigError, FileNotFoundError, IDXError) as exc:  # raised before training
        print(f"energy-callbacks demo: {exc}", file=sys.stderr)
        return 2
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .plot import MetricsFileError, distinct_labels, plot_curves, read_curve

    labels = _names(args.labels) if args.labels else distinct_labels(args.files)
    try:
        if len(labels) != len(args.files):
            raise MetricsFileError(
                f"--labels gives {len(labels)} labels for {len(args.files)} files; give one each"
            )
        curves = [
            read_curve(path, accuracy=args.accuracy, label=label)
            for path, label in zip(args.files, labels, strict=True)
        ]
    except MetricsFileError as exc:
        print(f"energy-callbacks plot: {exc}", file=sys.stderr)
        return 2
    out = plot_curves(curves, args.out, title=args.title)
    table = Table(title="Curves")
    for col in ("run", "points", "accuracy column", "final accuracy", "M1", "M0"):
        table.add_column(col, justify="left" if col in ("run", "accuracy column") else "right")
    for c in curves:
        table.add_row(
            c.label,
            str(len(c.accuracy)),
            c.accuracy_column,
            f"{c.accuracy[-1]:.3f}",
            f"{c.energy[-1]:.4g}",
            "-" if c.updates is None else f"{c.updates[-1]:.4g}",
        )
    console = Console() if sys.stdout.isatty() else Console(width=150)
    console.print(table)
    console.print(f"Plot saved to {out}")
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def run_reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.markdown import Markdown

    from .reproduce import Config, reproduce
    from .reproduce.frameworks import KerasUnavailable

    if args.experiment == "report":
        return _report(args)

    try:
        config = Config(
            dataset=args.dataset,
            data_dir=Path(args.data_dir) if args.data_dir else None,
            seeds=args.seeds,
            quick=args.quick,
            out=Path(args.out),
            target=args.target,
            sizes=_ints(args.sizes, "--sizes"),
            rules=tuple(args.rules.split(",")) if args.rules else None,
            max_samples=args.max_samples,
            eval_every=args.eval_every,
            threads=args.threads,
            preprocessing=args.preprocessing,
            output_lr=args.output_lr,
            extra={
                key: value
                for key, value in (
                    ("thetas", args.thetas),
                    ("taus", args.taus),
                    ("maintenance_costs", args.maintenance_costs),
                    ("lrs", args.lrs),
                    ("batch_sizes", args.batch_sizes),
                    ("fractions", args.fractions),
                )
                if value
            },
        )
        table, csv_path = reproduce(args.experiment, config)
    except (ValueError, FileNotFoundError, KerasUnavailable) as exc:
        print(f"energy-callbacks reproduce: {exc}", file=sys.stderr)
        return 2
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(Markdown(table))
    stem = csv_path.with_suffix("")
    console.print(f"wrote {csv_path}, {stem}.md and {stem}.png")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .reproduce.results import build_report

    if not args.data:
        print("energy-callbacks reproduce report: pass --data DIR, the run CSVs", file=sys.stderr)
        return 2
    try:
        written = build_report(Path(args.data), Path(args.out))
    except (ValueError, FileNotFoundError) as exc:
        print(f"energy-callbacks reproduce report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} tables (and their plots) into {args.out}:")
    for path in written:
        print(f"  {path}")
    return 0


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"{flag} takes comma-separated integers, e.g. 100,1000; got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="energy-callbacks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train one network with backprop and energy-saving rules, through Lightning "
        "and Keras: table and plot",
        description="Train a small MLP on the bundled digits with each rule, through "
        "PyTorch Lightning and (when installed) Keras; print a table of the energy spent "
        "and save a plot of accuracy against energy.",
    )
    demo.add_argument(
        "--rules",
        default="backprop,combined,lazy",
        help="rule names, comma-separated (default backprop,combined,lazy); "
        "see energy_callbacks.reproduce.rules",
    )
    demo.add_argument(
        "--frameworks",
        help="lightning,keras (default: Lightning, and Keras when it is installed)",
    )
    demo.add_argument("--hidden", type=int, default=256, help="hidden units (default 256)")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    demo.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    demo.add_argument("--lr", type=float, default=0.2, help="SGD learning rate (default 0.2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dataset", choices=["digits", "idx"], default="digits")
    demo.add_argument("--data-dir", help="directory of MNIST-style IDX files (with --dataset idx)")
    demo.add_argument("--train-samples", type=int, help="use the first N training samples")
    demo.add_argument(
        "--out", default="demo-results", help="output directory (default demo-results)"
    )
    demo.set_defaults(run=run_demo)

    plot = sub.add_parser(
        "plot",
        help="accuracy against energy from Lightning or Keras CSVLogger files",
        description="Turn Lightning or Keras CSVLogger files (with the plasticity/energy "
        "column PlasticityCallback logs) into a plot of accuracy against energy, one line "
        "per file.",
    )
    plot.add_argument("files", nargs="+", help="metrics CSV files")
    plot.add_argument("--out", default="energy_vs_accuracy.png", help="PNG to write")
    plot.add_argument(
        "--accuracy", help="accuracy column (default: val_accuracy, val_acc, ... if present)"
    )
    plot.add_argument("--labels", help="legend labels, comma-separated, one per file")
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(run=run_plot)

    from .reproduce.config import DATASETS

    rep = sub.add_parser(
        "reproduce",
        help="rerun a paper experiment through the Lightning callback: CSV, table and plot",
        description="Rerun one experiment of the papers through the framework callbacks. "
        "Finished runs in OUT/EXPERIMENT.csv are not repeated. "
        "`reproduce report --data DIR --out DIR` builds the claims table and every table and "
        "plot from the runs' CSVs in DIR, without training.",
    )
    rep.add_argument(
        "experiment",
        choices=[
            "size-sweep",
            "lazy",
            "mistakes",
            "combined",
            "frameworks",
            "caching",
            "concentration",
            "report",
        ],
    )
    rep.add_argument(
        "--data",
        help="report: the folder of run CSVs to build the results from (its --out is where "
        "claims.md and the tables and plots go)",
    )
    rep.add_argument(
        "--data-dir",
        help="directory of IDX files (default for fashion-mnist: "
        "/usr/share/datasets/fashion-mnist)",
    )
    rep.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    rep.add_argument("--seeds", type=int, default=1, help="seeds per configuration (default 1)")
    rep.add_argument("--quick", action="store_true", help="small smoke run (under 3 minutes)")
    rep.add_argument("--out", default="reproduce-results", help="output directory")
    rep.add_argument(
        "--target",
        type=float,
        help="test accuracy to stop at (default 0.85 Fashion-MNIST, 0.95 MNIST, 0.7 with --quick)",
    )
    rep.add_argument(
        "--sizes", help="hidden sizes N, comma-separated (size-sweep; the first one for the others)"
    )
    rep.add_argument(
        "--rules",
        help="rule names, comma-separated (size-sweep, combined, "
        "frameworks); see energy_callbacks.reproduce.rules",
    )
    rep.add_argument("--max-samples", type=int, help="training samples per run (budget)")
    rep.add_argument("--eval-every", type=int, help="samples between tests (default 2000)")
    rep.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    rep.add_argument(
        "--preprocessing",
        choices=["package", "reference"],
        default="package",
        help="package: subtract the per-pixel training mean; reference: the authors' code "
        "(one mean over all pixels, N(0, 0.001) noise on the training and test inputs)",
    )
    rep.add_argument(
        "--output-lr",
        default="same",
        help="output layer step size: same (0.01, as the hidden layer), scaled "
        "(0.01 * min(1, 1000 / N): stable at large N) or a number",
    )
    rep.add_argument("--thetas", help="caching: consolidation thresholds, comma-separated")
    rep.add_argument("--taus", help="caching: decay times in steps, comma-separated (inf: none)")
    rep.add_argument(
        "--maintenance-costs", help="caching: maintenance costs per step, comma-separated"
    )
    rep.add_argument("--lrs", help="lazy: the learning-rate grid, comma-separated")
    rep.add_argument("--batch-sizes", help="lazy: batch sizes, comma-separated (default 1,32,128)")
    rep.add_argument(
        "--fractions",
        help="lazy: shares of the training set below 1, comma-separated (default 0.1,0.25,0.5)",
    )
    rep.set_defaults(run=run_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
