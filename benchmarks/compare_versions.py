"""The torch adapter's hook overhead, this checkout against another one, in one process.

On a shared 2-core machine the plain step drifts by up to 3x between runs, so
comparing two runs of ``overhead.py`` says little about a change of 0.2 ms.
This script loads the other checkout's package under another name
(``ec_base``) next to this one and trains one copy of the 784-1000-10 MLP per
configuration and version in a plain torch loop (SGD, batch 32), alternating
64-step blocks, so both versions see the same machine state.

    python benchmarks/compare_versions.py --base /path/to/other/checkout
    git worktree add /tmp/base HEAD~1 && python benchmarks/compare_versions.py --base /tmp/base

Prints, per configuration and version, the median step time over the plain
step's and the median time of ``optimizer.step()`` beyond the plain one (the
hooks' cost in ms). Only this process's figures compare with each other.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import energy_callbacks

CONFIGS = {
    "tracking only": lambda m: m.Plasticity(),
    "TopFraction(0.1)": lambda m: m.Plasticity(synapses=m.TopFraction(0.1)),
    "TopFraction(0.1, approximate=True)": lambda m: m.Plasticity(
        synapses=m.TopFraction(0.1, approximate=True)
    ),
    "combined (path 10% units + top 10%)": lambda m: m.Plasticity(
        units=m.TopUnits(0.1, path=True), synapses=m.TopFraction(0.1)
    ),
}


def load_base(checkout: Path) -> tuple[object, object]:
    """The other checkout's package as ``ec_base`` (its imports are relative)."""
    source = checkout / "energy_callbacks"
    if not (source / "__init__.py").exists():
        raise SystemExit(f"--base: {checkout} holds no energy_callbacks package")
    root = Path(tempfile.mkdtemp(prefix="ec_base_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    shutil.copytree(source, root / "ec_base", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(root))
    return importlib.import_module("ec_base"), importlib.import_module("ec_base.torch")


def model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 1000), nn.LeakyReLU(0.1), nn.Linear(1000, 10))
    return net, torch.optim.SGD(net.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=8, help="64-step blocks per copy")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import energy_callbacks.torch as this_torch

    base, base_torch = load_base(args.base)
    versions = {"base": (base, base_torch), "this": (energy_callbacks, this_torch)}
    runs: dict[tuple[str, str], tuple[nn.Module, torch.optim.Optimizer, list, list]] = {}
    runs[("plain", "")] = (*model(), [], [])
    for name, make in CONFIGS.items():
        for version, (package, adapter) in versions.items():
            net, opt = model()
            adapter.attach(net, opt, make(package))
            runs[(name, version)] = (net, opt, [], [])
    x = torch.randn(64, args.batch_size, 784)
    y = torch.randint(0, 10, (64, args.batch_size))
    for block in range(args.rounds + 1):  # the first block warms up
        for net, opt, steps, hooks in runs.values():
            for i in range(64):
                start = time.perf_counter()
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[i]), y[i]).backward()
                mid = time.perf_counter()
                opt.step()
                end = time.perf_counter()
                if block:
                    steps.append(end - start)
                    hooks.append(end - mid)
    plain_step = statistics.median(runs[("plain", "")][2])
    plain_opt = statistics.median(runs[("plain", "")][3])
    print(
        f"torch {torch.__version__}, batch {args.batch_size}, {args.rounds} x 64 steps per copy; "
        f"plain step {plain_step * 1e3:.3f} ms, of which optimizer.step {plain_opt * 1e3:.3f} ms"
    )
    print(f"{'configuration':<38} {'version':<7} {'step ratio':>10} {'hooks ms':>9}")
    for (name, version), (_, _, steps, hooks) in runs.items():
        if version:
            ratio = statistics.median(steps) / plain_step
            extra = (statistics.median(hooks) - plain_opt) * 1e3
            print(f"{name:<38} {version:<7} {ratio:>10.2f} {extra:>9.3f}")


if __name__ == "__main__":
    main()
