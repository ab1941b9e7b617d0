"""Command line: ``energy-callbacks demo`` and ``energy-callbacks reproduce``.

``demo`` trains the reference MLP (SCIENCE.md section 3) on a bundled or local
data set with each energy-saving rule, through the framework-free core, and
prints the energy each one spent next to plain backprop.

``reproduce EXPERIMENT`` reruns one of the papers' experiments through the
framework callbacks and writes a CSV, a markdown table and a PNG plot
(see :mod:`energy_callbacks.reproduce` and docs/reproduce.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .core import FixedSubnetwork, Plasticity, TopFraction, TopUnits


def demo_rules(n_hidden: int) -> dict[str, Callable[[], Plasticity]]:
    """The rules the demo compares, by display name (fresh Plasticity each call)."""
    k_fixed = max(1, n_hidden // 10)
    return {
        "backprop": lambda: Plasticity(),
        "top 10% |dw|": lambda: Plasticity(synapses=0.1),
        "top 5% |dw| equal count": lambda: Plasticity(synapses=TopFraction(0.05, equal_count=True)),
        "top 10% units, path": lambda: Plasticity(units=TopUnits(0.1, path=True)),
        f"fixed subnetwork k={k_fixed}": lambda: Plasticity(units=FixedSubnetwork(k_fixed)),
        "units + synapses": lambda: Plasticity(units=TopUnits(0.1, path=True), synapses=0.05),
        "lazy": lambda: Plasticity(samples="lazy"),
        "memorized mistakes": lambda: Plasticity(samples="mistakes"),
        "units + synapses + lazy": lambda: Plasticity(
            units=TopUnits(0.1, path=True), synapses=0.05, samples="lazy"
        ),
    }


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from . import data
    from .reference import PaperMLP, train

    console = Console() if sys.stdout.isatty() else Console(width=120)
    if args.dataset == "digits":
        ds = data.load_digits(seed=args.seed)
    else:
        ds = data.load_idx_dataset(args.data_dir or data.FASHION_MNIST_DIR)
    x_train, mean = data.paper_inputs(ds.train.images)
    x_test, _ = data.paper_inputs(ds.test.images, mean)
    n_in = x_train.shape[1]
    console.print(
        f"[bold]{ds.name}[/]: {len(x_train)} train / {len(x_test)} test samples; "
        f"MLP {n_in}-{args.hidden}-{ds.n_classes}, SGD lr {args.lr}, batch 1, "
        f"stop at {args.target:.0%} test accuracy (at most {args.epochs} epochs)"
    )
    rules = demo_rules(args.hidden)
    results = {}
    for name in track(list(rules), description="training", console=console, transient=True):
        results[name] = train(
            PaperMLP(n_in, args.hidden, ds.n_classes, seed=args.seed),
            rules[name](),
            x_train,
            ds.train.labels,
            x_test,
            ds.test.labels,
            lr=args.lr,
            max_samples=args.epochs * len(x_train),
            eval_every=args.eval_every,
            target_accuracy=args.target,
            seed=args.seed,
        )
    base = results["backprop"].report
    table = Table(title="Plasticity energy to reach the target (reference MLP, NumPy core)")
    for col in ("rule", "epochs", "test acc", "M1", "M0", "M1_min", "inefficiency"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    table.add_column("M1 saved", justify="right")
    table.add_column("M0 saved", justify="right")
    table.add_column("learned", justify="right")
    for name, r in results.items():
        rep = r.report
        table.add_row(
            name + ("" if r.reached else " (target missed)"),
            f"{r.samples / len(x_train):.2f}",
            f"{r.accuracy:.3f}",
            f"{rep.m1:.3g}",
            f"{rep.m0:.3g}",
            f"{rep.m1_min:.3g}",
            f"{rep.inefficiency:.1f}",
            f"{base.m1 / rep.m1:.1f}x",
            f"{base.m0 / rep.m0:.1f}x",
            f"{rep.samples_learned / max(rep.samples_seen, 1):.0%}",
        )
    console.print(table)
    console.print(
        "M1 = sum |dw| (plasticity energy), M0 = number of synaptic updates, M1_min = "
        "sum |w_T - w_0| (the physical limit), inefficiency = M1 / M1_min; 'learned' = "
        "share of samples that passed the sample gate."
    )
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.markdown import Markdown

    from .reproduce import Config, reproduce
    from .reproduce.frameworks import KerasUnavailable

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
            extra={
                key: value
                for key, value in (
                    ("thetas", args.thetas),
                    ("taus", args.taus),
                    ("maintenance_costs", args.maintenance_costs),
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
    demo = sub.add_parser("demo", help="compare the energy-saving rules on the reference MLP")
    demo.add_argument("--dataset", choices=["digits", "idx"], default="digits")
    demo.add_argument("--data-dir", help="directory of MNIST-style IDX files (with --dataset idx)")
    demo.add_argument("--hidden", type=int, default=500, help="hidden units N (default 500)")
    demo.add_argument("--target", type=float, default=0.9, help="test accuracy to stop at")
    demo.add_argument("--epochs", type=int, default=5, help="at most this many epochs")
    demo.add_argument("--lr", type=float, default=0.01)
    demo.add_argument("--eval-every", type=int, default=200, help="samples between tests")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=run_demo)

    from .reproduce.config import DATASETS

    rep = sub.add_parser(
        "reproduce",
        help="rerun a paper experiment through the Lightning callback: CSV, table and plot",
        description="Rerun one experiment of the papers through the framework callbacks. "
        "Finished runs in OUT/EXPERIMENT.csv are not repeated.",
    )
    rep.add_argument(
        "experiment",
        choices=["size-sweep", "lazy", "mistakes", "combined", "frameworks", "caching"],
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
    rep.add_argument("--thetas", help="caching: consolidation thresholds, comma-separated")
    rep.add_argument("--taus", help="caching: decay times in steps, comma-separated (inf: none)")
    rep.add_argument(
        "--maintenance-costs", help="caching: maintenance costs per step, comma-separated"
    )
    rep.set_defaults(run=run_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "demo":
        return int(args.run(args))
    if not 0 < args.target <= 1:
        print("energy-callbacks: --target must be an accuracy in (0, 1]", file=sys.stderr)
        return 2
    if args.hidden < 1 or args.epochs < 1 or args.eval_every < 1:
        print("energy-callbacks: --hidden, --epochs and --eval-every must be >= 1", file=sys.stderr)
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
