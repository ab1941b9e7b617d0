"""Extra peak memory of measuring and masking, per byte of parameters, on every path.

For each path (the torch adapter on float32 CPU tensors, the NumPy/numba path; the
torch adapter on bfloat16, the torch-ops path that GPUs use; Keras on TensorFlow,
JAX and torch; on a machine with a CUDA device also the torch adapter there, whose
peak is the device's ``max_memory_allocated``), each rule (none, tracking only,
exact ``TopFraction(0.1)``) and two widths of a 3-layer MLP (``w -> w -> w -> 10``,
Adam, batch 32, a few steps), one fresh process trains and reports its peak
resident memory over the steps after the first (``VmHWM`` reset by ``reset_peak``,
with glibc's mmap threshold fixed: ``MMAP_THRESHOLD``).
The extra memory of a rule is its peak minus the peak of the same run without the
callback.
Between the two widths the fixed costs (imports, JIT, tracing) cancel:

- ``per byte``: the slope of the extra memory over the parameters' bytes, the part
  that grows with the model (a snapshot of the weights is 1.0, w_0 another 1.0);
- ``fixed``: what is left at the smaller width, in MiB.

    python benchmarks/memory.py                          # every path, widths 3072 6144
    python benchmarks/memory.py --paths torch-fp32 keras-jax --widths 1024 2048
    python benchmarks/memory.py --repeat 3                # each peak the lowest of 3 runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

PATHS = ("torch-fp32", "torch-bf16", "keras-tensorflow", "keras-jax", "keras-torch")
GPU_PATHS = ("torch-cuda-fp32", "torch-cuda-bf16")
"""On a CUDA device: the peak is ``torch.cuda.max_memory_allocated`` (device memory;
w_0 lives in host memory and is not in it)."""
RULES = (
    "none", "tracking", "TopFraction(0.1)", "TopFraction(0.1, approximate)", "TopUnits(0.1)",
    "TopUnits(0.1, path)", "Threshold(1e-4)", "path+TopFraction(0.1)", "caching",
)  # fmt: skip
DEFAULT_RULES = ("tracking", "TopFraction(0.1)")
STEPS = 4
BATCH = 32
MMAP_THRESHOLD = 1 << 20
"""glibc's malloc serves blocks of at least this many bytes by ``mmap`` and gives them
back when freed. Its default threshold moves up as large blocks are freed, after which
they come from the heap and stay resident, so a freed tensor's pages could count in a
later peak or not, from run to run: about 100 MiB at 200 MiB of parameters. With the
threshold fixed the peak is that of the live tensors; the torch paths' peaks repeat to
within 3 MiB. TensorFlow runs independent ops of a step side by side, so which
temporaries overlap varied from run to run (its peak by 290 MiB at 288 MiB of
parameters); the TensorFlow path runs them one at a time (``TF_NUM_INTEROP_THREADS=1``),
and its peaks repeat to within 1 MiB."""


def gpu_paths() -> tuple[str, ...]:
    """The CUDA paths when a CUDA device is present (checked in a child process, so
    this one imports no framework)."""
    probe = "import torch; print(torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return GPU_PATHS if out.stdout.strip() == "True" else ()


def reset_peak() -> None:
    """Start the peak over from the memory resident now, after the first step (which
    compiles, JITs and builds the optimizer's state): what the compilers hold while they
    work is host memory that varies from run to run (TensorFlow's exact selection: by
    70 MiB at 288 MiB of parameters), and what a step holds is what decides whether a
    model fits. Freed heap pages are given back first, so they do not count."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        return  # not Linux: the peak of the whole run
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    clear_refs.write_text("5")


def peak_mib() -> float:
    """The process's peak resident memory since ``reset_peak``, in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rule_kwargs(rule: str) -> dict | None:
    """The callback's arguments for ``rule`` (None: no callback)."""
    from energy_callbacks import Caching, Threshold, TopFraction, TopUnits

    return {
        "none": None,
        "tracking": {},
        "TopFraction(0.1)": {"synapses": TopFraction(0.1)},
        "TopFraction(0.1, approximate)": {"synapses": TopFraction(0.1, approximate=True)},
        "TopUnits(0.1)": {"units": TopUnits(0.1)},
        "TopUnits(0.1, path)": {"units": TopUnits(0.1, path=True)},
        "Threshold(1e-4)": {"synapses": Threshold(1e-4)},
        "path+TopFraction(0.1)": {"units": TopUnits(0.1, path=True), "synapses": 0.1},
        "caching": {"caching": Caching(theta=1e-3, tau=math.inf, maintenance_cost=0.1)},
    }[rule]


def run_torch(width: int, rule: str, dtype_name: str, device: str = "cpu") -> int:
    """Train in a plain torch loop (what the Lightning callback runs); the parameters' bytes."""
    import torch
    from torch import nn

    from energy_callbacks import Plasticity
    from energy_callbacks.torch import attach

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    ).to(device, dtype)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    kwargs = rule_kwargs(rule)
    handle = None if kwargs is None else attach(model, optimizer, Plasticity(**kwargs))
    x = torch.randn(BATCH, width, dtype=dtype, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    # torch's CPU backward in bfloat16 takes 13 s a step at width 6144: there the
    # gradients are drawn at random (what the adapter sees is the optimizer's step)
    drawn = device == "cpu" and dtype == torch.bfloat16
    for step in range(STEPS):
        optimizer.zero_grad()
        if drawn:
            model(x)  # with autograd on: the unit rules learn the wiring from it
            for p in model.parameters():
                p.grad = torch.randn_like(p).mul_(1e-3)
        else:
            nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()
        if step == 0:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak()
    if handle is not None:
        handle.report()  # w_T - w_0 is folded when read: part of the cost
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_keras(width: int, rule: str) -> int:
    import keras
    import numpy as np

    from energy_callbacks.keras import PlasticityCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((width,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10),
    ])  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * STEPS, width)).astype("float32")
    y = rng.integers(0, 10, BATCH * STEPS)
    kwargs = rule_kwargs(rule)
    callbacks = [] if kwargs is None else [PlasticityCallback(**kwargs)]
    after_first_step = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: reset_peak() if batch == 0 else None
    )
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[*callbacks, after_first_step])
    if callbacks:
        callbacks[0].report()
    return sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)


def child(path: str, rule: str, width: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    if path in GPU_PATHS:
        import torch

        nbytes = run_torch(width, rule, path.split("-")[2], device="cuda")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"peak_mib": peak, "param_bytes": nbytes}))
        return
    if path.startswith("torch"):
        nbytes = run_torch(width, rule, path.split("-")[1])
    else:
        nbytes = run_keras(width, rule)
    print(json.dumps({"peak_mib": peak_mib(), "param_bytes": nbytes}))


def measure(path: str, rule: str, width: int) -> dict:
    """One fresh process: its peak memory and the parameters' bytes."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    if path.startswith("keras-"):
        env["KERAS_BACKEND"] = path.split("-", 1)[1]
    if path == "keras-tensorflow":
        env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", path, rule, str(width)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{path} {rule} {width} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def lowest(path: str, rule: str, width: int, repeat: int) -> dict:
    """The run with the lowest peak of ``repeat`` fresh processes: TensorFlow's own
    peak varies by about 150 MiB from run to run at 300 MiB of parameters."""
    return min((measure(path, rule, width) for _ in range(repeat)), key=lambda r: r["peak_mib"])


def table(
    paths: list[str], rules: list[str], widths: tuple[int, int], repeat: int = 1
) -> list[dict]:
    """One row per (path, rule): the extra peak memory per parameter byte (the slope
    between the two widths) and the fixed part, in MiB, at the smaller width; each
    peak the lowest of ``repeat`` runs."""
    small, large = widths
    rows = []
    for path in paths:
        base = {w: lowest(path, "none", w, repeat) for w in (small, large)}
        for rule in rules:
            runs = {w: lowest(path, rule, w, repeat) for w in (small, large)}
            extra = {w: runs[w]["peak_mib"] - base[w]["peak_mib"] for w in (small, large)}
            mib = {w: base[w]["param_bytes"] / 2**20 for w in (small, large)}
            slope = (extra[large] - extra[small]) / (mib[large] - mib[small])
            rows.append({
                "path": path, "rule": rule, "per_byte": slope,
                "fixed_mib": extra[small] - slope * mib[small],
                "param_mib": [mib[small], mib[large]], "extra_mib": [extra[small], extra[large]],
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--paths", nargs="+", default=list(PATHS + gpu_paths()), choices=PATHS + GPU_PATHS
    )
    parser.add_argument("--widths", type=int, nargs=2, default=[3072, 6144])
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), choices=RULES[1:])
    parser.add_argument("--repeat", type=int, default=1, help="lowest peak of this many runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    small, large = args.widths
    rows = table(args.paths, args.rules, (small, large), args.repeat)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"3-layer MLP, widths {small} and {large}, Adam, batch {BATCH}, {STEPS} steps")
    print(f"{'path':<18} {'rule':<30} {'per byte':>9} {'fixed MiB':>10}  extra MiB (params MiB)")
    for r in rows:
        sizes = ", ".join(
            f"{e:.0f} ({p:.0f})" for e, p in zip(r["extra_mib"], r["param_mib"], strict=True)
        )
        print(
            f"{r['path']:<18} {r['rule']:<30} {r['per_byte']:8.2f}x {r['fixed_mib']:10.0f}  {sizes}"
        )


if __name__ == "__main__":
    main()
