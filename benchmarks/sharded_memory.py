"""Extra peak memory per process under FSDP2 (``fully_shard``), per byte of the whole
model's parameters, against one process training the model whole.

The model, steps and measurement are those of ``benchmarks/memory.py`` (a 3-layer
MLP ``w -> w -> w -> 10``, Adam, batch 32 per process, the peak resident memory of
the steps after the first, the slope between two widths). With the model sharded
over ``P`` processes, each process snapshots and keeps w_0 of its own rows only, so
tracking's extra memory per process is about ``2 / P`` of the model's bytes.

    python benchmarks/sharded_memory.py                       # 1 and 2 processes
    python benchmarks/sharded_memory.py --widths 1024 2048 --rules tracking
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import MMAP_THRESHOLD, peak_mib, reset_peak, rule_kwargs  # noqa: E402

RULES = ("tracking", "TopFraction(0.1)")
STEPS = 4
BATCH = 32


def child(width: int, rule: str, sharded: bool, out: Path) -> None:
    """Train (one process, or one of the processes torchrun started) and write the peak."""
    import warnings

    import torch
    from torch import nn

    from energy_callbacks import Plasticity
    from energy_callbacks.torch import attach

    warnings.filterwarnings("ignore")
    rank = 0
    if sharded:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )  # fmt: skip
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if sharded:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    kwargs = rule_kwargs(rule)
    handle = None if kwargs is None else attach(model, optimizer, Plasticity(**kwargs))
    x = torch.randn(BATCH, width)
    y = torch.randint(0, 10, (BATCH,))
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step == 0:
            reset_peak()
    if handle is not None:
        handle.report()
    (out / f"rank{rank}.json").write_text(json.dumps({"peak_mib": peak_mib(), "bytes": nbytes}))
    if sharded:
        dist.barrier()
        os._exit(0)


def measure(width: int, rule: str, processes: int) -> float:
    """The largest peak over the processes, in MiB; the model's bytes."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--child", str(width), rule, str(processes > 1), tmp]
        if processes > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*launcher, "--nproc_per_node", str(processes), *args]
        else:
            cmd = [sys.executable, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{rule} {width} x{processes} failed:\n{done.stderr[-3000:]}")
        runs = [json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")]
    return max(r["peak_mib"] for r in runs), runs[0]["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--widths", type=int, nargs=2, default=(2048, 4096))
    parser.add_argument("--rules", nargs="+", default=list(RULES))
    parser.add_argument("--processes", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args()
    if args.child:
        width, rule, sharded, out = args.child
        child(int(width), rule, sharded == "True", Path(out))
        return
    small, large = args.widths
    print("| processes | rule | extra per process, per byte of the model | fixed MiB |")
    print("|---|---|---|---|")
    for processes in args.processes:
        base = {w: measure(w, "none", processes) for w in (small, large)}
        for rule in args.rules:
            extra, mib = {}, {}
            for w in (small, large):
                peak, nbytes = measure(w, rule, processes)
                extra[w], mib[w] = peak - base[w][0], nbytes / 2**20
            slope = (extra[large] - extra[small]) / (mib[large] - mib[small])
            fixed = extra[small] - slope * mib[small]
            print(f"| {processes} | {rule} | {slope:.2f}x | {fixed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
