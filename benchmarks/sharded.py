"""Step time and collectives of the torch adapter under FSDP2, against unsharded.

The transformer workload of ``benchmarks/overhead.py`` (a 2-layer causal
TransformerEncoder language model, width 128, vocabulary 1000, 32 x 128 tokens a
step, Adam). Three copies train batch by batch in a rotating order: without the
callback, measuring only, and with the exact ``TopFraction(0.1)``. First in one
process, the model whole (2 threads); then under ``torchrun`` with 2 processes (1
thread each), every encoder layer, the embedding and the head sharded with
``fully_shard``, each process on half of every batch.

Prints, per configuration, the median step time over the plain one's, and under
FSDP2 the collectives the adapter called inside ``optimizer.step()`` (all-reduces
and all-gathers, with their largest size in entries), per step and per parameter.

    python benchmarks/sharded.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = {"plain": None, "tracking": {}, "TopFraction(0.1), exact": {"synapses": 0.1}}


class Collectives:
    """Counts the calls of torch.distributed's all-reduce and all-gathers while on."""

    NAMES = ("all_reduce", "all_gather_object", "all_gather", "all_gather_into_tensor")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.on, self.calls, self.largest = False, 0, 0
        for name in self.NAMES:
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            if self.on:
                self.calls += 1
                first = args[1] if fn.__name__ == "all_gather_object" else args[0]
                size = first.numel() if hasattr(first, "numel") else getattr(first, "size", 1)
                self.largest = max(self.largest, int(size))
            return fn(*args, **kwargs)

        counted.__name__ = fn.__name__
        return counted


def child(steps: int, sharded: bool, out: Path) -> None:
    import warnings

    import torch
    from overhead import LM, token_batches, token_loss

    from energy_callbacks import Plasticity
    from energy_callbacks.torch import attach

    warnings.filterwarnings("ignore")
    rank, counter = 0, None
    if sharded:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        counter = Collectives()
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(2)
    runs = {}
    for name, rules in CONFIGS.items():
        torch.manual_seed(0)
        model = LM()
        if sharded:
            for layer in (model.embed, *model.encoder.layers, model.head):
                fully_shard(layer)
            fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        handle = None if rules is None else attach(model, opt, Plasticity(**rules))
        runs[name] = (model, opt, handle)
    n_params = len(list(runs["plain"][0].parameters()))
    batches = token_batches(steps + 2)
    times = {name: [] for name in CONFIGS}
    calls = {name: [] for name in CONFIGS}
    largest = {name: 0 for name in CONFIGS}
    names = list(CONFIGS)
    for i, (x, y) in enumerate(batches):
        if sharded:  # each process its half of the batch
            half = x.shape[0] // 2
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        for name in names[i % 3 :] + names[: i % 3]:  # a rotating order
            model, opt, _ = runs[name]
            if sharded:
                dist.barrier()
            t0 = time.perf_counter()
            token_loss(model(x), y).backward()
            if counter is not None:
                counter.on, counter.calls, counter.largest = True, 0, 0
            opt.step()
            if counter is not None:
                counter.on = False
            opt.zero_grad()
            if sharded:
                dist.barrier()
            if i >= 2:  # 2 warm-up steps
                times[name].append(time.perf_counter() - t0)
                if counter is not None:
                    calls[name].append(counter.calls)
                    largest[name] = max(largest[name], counter.largest)
    plain = statistics.median(times["plain"])
    result = {
        name: {
            "ms": 1000 * statistics.median(t),
            "ratio": statistics.median(t) / plain,
            "calls_per_step": statistics.median(calls[name]) if calls[name] else 0,
            "largest": largest[name],
            "per_parameter": (statistics.median(calls[name]) / n_params) if calls[name] else 0,
        }
        for name, t in times.items()
    }
    (out / f"rank{rank}.json").write_text(json.dumps({"params": n_params, "rows": result}))
    if sharded:
        dist.barrier()
        os._exit(0)


def run(steps: int, sharded: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--child", str(steps), str(sharded), tmp]
        if sharded:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc_per_node", "2", *args]
        else:
            cmd = [sys.executable, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(
                f"{'sharded' if sharded else 'whole'} run failed:\n{done.stderr[-3000:]}"
            )
        return json.loads((Path(tmp) / "rank0.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if args.child:
        steps, sharded, out = args.child
        child(int(steps), sharded == "True", Path(out))
        return
    whole, sharded = run(args.steps, False), run(args.steps, True)
    print(f"{sharded['params']} parameters; median over {args.steps} steps")
    print(
        "| configuration | whole: step ms | ratio | FSDP2, 2 processes: step ms | ratio |"
        " sharded / whole ratio | collectives a step | per parameter | largest (entries) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        w, s = whole["rows"][name], sharded["rows"][name]
        print(
            f"| {name} | {w['ms']:.1f} | {w['ratio']:.3f}x | {s['ms']:.1f} | {s['ratio']:.3f}x |"
            f" {s['ratio'] / w['ratio']:.3f} | {s['calls_per_step']:.0f} |"
            f" {s['per_parameter']:.2f} | {s['largest']} |"
        )


if __name__ == "__main__":
    main()
