"""``attach`` on a model sharded with FSDP2 (``fully_shard``), run by
tests/torch/test_sharded.py under ``torchrun --standalone --nproc_per_node 2`` (gloo).

Every case trains one model sharded over the two processes, each on its half of
the same global batches, and beside it, in each process, an unsharded copy on
the whole batches. A witness gathers the sharded weights around every optimizer
step (``full_tensor()``, a test's privilege) and sums the changes itself. Each
process writes ``rank<r>.json`` into the folder given as the first argument.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from energy_callbacks import (
    Caching,
    FixedSubnetwork,
    Plasticity,
    RandomSynapses,
    RandomUnits,
    Threshold,
    TopFraction,
    TopUnits,
)
from energy_callbacks.torch import attach

STEPS = 6
BATCH = 8  # global; each process takes its half


class Regressor(nn.Module):
    """An embedding of 11 rows (uneven over 2), a 16 -> 33 layer (uneven), and a
    33 -> 1 head (one row: the second process holds none of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.hidden = nn.Linear(16, 33)
        self.head = nn.Linear(33, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens).mean(1)))).sum(-1)


def classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 3))


def shard(model: nn.Module) -> nn.Module:
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def batches(kind: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        if kind == "regression":
            out.append(
                (torch.randint(0, 11, (BATCH, 5), generator=g), torch.randn(BATCH, generator=g))
            )
        else:
            out.append(
                (torch.randn(BATCH, 20, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            )
    return out


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def figures(report) -> dict:
    return {
        "m1": report.m1,
        "m0": report.m0,
        "m1_min": report.m1_min,
        "m0_min": report.m0_min,
        "steps": report.steps,
        "skipped": report.skipped_steps,
        "learned": report.samples_learned,
        "per_layer": {n: [e.m1, e.m0] for n, e in report.per_layer.items()},
    }


def run(case: str, rank: int) -> dict:
    kind = "regression" if case.startswith(("regression", "nan")) else "classification"
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    models = []
    for _ in range(2):  # the same initial weights, one to shard and one whole
        torch.manual_seed(0)
        models.append((Regressor() if kind == "regression" else classifier()).to(dtype))
    whole, sharded = models[0], shard(models[1])
    plasticity = (lambda: Plasticity(samples="lazy")) if case == "lazy" else Plasticity
    opt_s = torch.optim.Adam(sharded.parameters(), lr=1e-2)
    opt_w = torch.optim.Adam(whole.parameters(), lr=1e-2)
    handle = attach(sharded, opt_s, plasticity())
    reference = attach(whole, opt_w, plasticity())
    w0 = full(sharded)
    m1 = torch.zeros((), dtype=torch.float64)
    m0 = 0
    half = BATCH // 2
    for step, (x, y) in enumerate(batches(kind, 1)):
        mine = slice(rank * half, (rank + 1) * half)
        for model, opt, h, xs, ys in (
            (sharded, opt_s, handle, x[mine], y[mine]),
            (whole, opt_w, reference, x, y),
        ):
            if case == "lazy":
                h.gate_batch(ys)
            out = model(xs)
            loss = (
                nn.functional.mse_loss(out.float(), ys)
                if kind == "regression"
                else nn.functional.cross_entropy(out.float(), ys)
            )
            loss.backward()
            if model is sharded:
                if case == "nan" and step == STEPS - 1 and rank == 0:
                    sharded.hidden.weight.grad.to_local()[0, 0] = float("nan")
                before = full(sharded)
            opt.step()
            opt.zero_grad()
            if model is sharded:
                after = full(sharded)
                for n in after:  # the change in the weights' dtype (at least float32)
                    wide = torch.promote_types(after[n].dtype, torch.float32)
                    d = (after[n].to(wide) - before[n].to(wide)).double()
                    m1 += d.abs().sum()
                    m0 += int(torch.count_nonzero(d))
                if case == "nan" and step == STEPS - 1:
                    last_undone = all(torch.equal(after[n], before[n]) for n in after)
    end = full(sharded)
    net = {n: end[n].double() - w0[n].double() for n in end}
    result = {
        "world": dist.get_world_size(),
        "sharded": figures(handle.report()),
        "whole": figures(reference.report()),
        "witness": {
            "m1": float(m1),
            "m0": m0,
            "m1_min": float(sum(d.abs().sum() for d in net.values())),
            "m0_min": int(sum(torch.count_nonzero(d) for d in net.values())),
        },
        "max_weight_gap": max(
            float((end[n].double() - p.detach().double()).abs().max())
            for n, p in whole.named_parameters()
        ),
        "local_rows": {n: list(p.to_local().shape) for n, p in sharded.named_parameters()},
    }
    if case == "nan":
        result["last_undone"] = last_undone
    handle.detach()
    reference.detach()
    return result


RULES = {
    "top-fraction": lambda: dict(synapses=TopFraction(0.1)),
    "approximate": lambda: dict(synapses=TopFraction(0.1, approximate=True)),
    "per-unit": lambda: dict(synapses=TopFraction(0.2, per_unit=True)),
    "equal-count": lambda: dict(synapses=TopFraction(0.1, equal_count=True)),
    "smallest": lambda: dict(synapses=TopFraction(0.3, largest=False)),
    "threshold": lambda: dict(synapses=Threshold(2e-3)),
    "random-synapses": lambda: dict(synapses=RandomSynapses(0.3, seed=1)),
    "fixed": lambda: dict(units=FixedSubnetwork(20)),
    "top-units": lambda: dict(units=TopUnits(0.25)),
    "path": lambda: dict(units=TopUnits(0.25, path=True)),
    "random-units": lambda: dict(units=RandomUnits(0.25, seed=2, path=True)),
    "combined": lambda: dict(
        units=TopUnits(0.25, path=True), synapses=TopFraction(0.2, equal_count=True)
    ),
    "combined-bf16": lambda: dict(units=TopUnits(0.25, path=True), synapses=TopFraction(0.1)),
    "top-fraction-bf16": lambda: dict(synapses=TopFraction(0.1)),
    "tracking-bf16": lambda: dict(),
    "caching": lambda: dict(caching=Caching(2e-3, 50, 0.1)),
}
"""Rule cases: a 200-101-3 classifier (101 units split 51/50, a 20 200-entry kernel
above the approximate rule's sample), SGD, each step checked against the NumPy core."""


def rule_case(case: str, rank: int) -> dict:
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    torch.manual_seed(0)
    model = shard(nn.Sequential(nn.Linear(200, 101), nn.ReLU(), nn.Linear(101, 3)).to(dtype))
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    handle = attach(model, opt, Plasticity(**RULES[case]()), adjacency=[("0", "2")])
    oracle = Plasticity(**RULES[case]())  # rules of its own: some cache their masks
    oracle.setup(handle.plasticity.topology)
    names = [s.name for s in handle.specs]
    g = torch.Generator().manual_seed(2)
    half = BATCH // 2
    exact_steps = 0
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 200, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
        mine = slice(rank * half, (rank + 1) * half)
        nn.functional.cross_entropy(model(x[mine].to(dtype)).float(), y[mine]).backward()
        params = dict(model.named_parameters())
        before = full(model)
        grads = {n: params[n].grad.full_tensor() for n in names}
        opt.step()
        opt.zero_grad()
        after = full(model)
        # SGD's proposal, computed whole (bit for bit in float32; 16-bit rounding of the
        # sharded step is not reproduced here)
        proposal = {n: before[n].add(grads[n], alpha=-lr) for n in names}
        wide = {n: torch.promote_types(before[n].dtype, torch.float32) for n in names}
        dw = [(proposal[n].to(wide[n]) - before[n].to(wide[n])).numpy() for n in names]
        masks = oracle.masks(dw)
        if oracle.caching is not None:  # the decay of the store goes into the weights
            oracle.record(dw)
            decay = oracle.cache(dw)
            proposal = {
                n: proposal[n] if d is None else proposal[n] + torch.from_numpy(np.asarray(d))
                for n, d in zip(names, decay)
            }
            exact_steps += int(all(torch.equal(after[n], proposal[n]) for n in names))
            continue
        applied = []
        same = True
        for n, m, d in zip(names, masks, dw):
            keep = (
                torch.ones_like(before[n], dtype=torch.bool)
                if m is None
                else torch.from_numpy(np.asarray(m, dtype=bool))
            )
            want = torch.where(keep, proposal[n], before[n])
            same = same and torch.equal(after[n], want)
            applied.append(np.where(keep.numpy(), d, 0))
        oracle.record(applied)
        exact_steps += int(same)
    got, want = handle.report(), oracle.report()
    if oracle.caching is not None:  # energy = consolidation + maintenance
        again = handle.report()  # reading sums over the processes, and changes nothing
        handle.detach()
        return {
            "read_twice_alike": again == got,
            "exact_steps": exact_steps,
            "energy": got.energy,
            "oracle_energy": want.energy,
            "updates": got.updates,
            "oracle_updates": want.updates,
            "transient": got.transient,
            "oracle_transient": want.transient,
        }
    out = {
        "exact_steps": exact_steps,
        "m1": got.m1,
        "m0": got.m0,
        "oracle_m1": want.m1,
        "oracle_m0": want.m0,
        "kept_fraction": got.m0 / (STEPS * sum(s.size for s in handle.specs)),
    }
    handle.detach()
    return out


def checkpointed(case: str, rank: int) -> dict:
    """Memorized mistakes + the top fraction: 6 steps straight, against 3 steps, a
    distributed checkpoint (torch.distributed.checkpoint) of model, optimizer and
    plasticity, and 3 more steps in a new model, optimizer and handle."""
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    folder = Path(sys.argv[1]) / "checkpoint"
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(BATCH, 20, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]
    half = BATCH // 2
    mine = slice(rank * half, (rank + 1) * half)

    def start():
        torch.manual_seed(0)
        model = shard(classifier())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rules = (
            Plasticity(synapses=TopFraction(0.2), caching=Caching(0.03, 50, 0.1))
            if case == "checkpoint-caching"
            else Plasticity(synapses=TopFraction(0.2), samples="mistakes")
        )
        return model, opt, attach(model, opt, rules)

    def train(model, opt, handle, steps):
        for step in steps:
            x, y = data[step]
            ids = torch.arange(BATCH)[mine] + BATCH * (step % 2)  # ids recur: memory counts
            if handle.gate is not None:
                handle.gate_batch(y[mine], ids)
            nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()

    def state(model, opt, handle):
        return {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, opt),
            "plasticity": handle.state_dict(),
        }

    straight = start()
    train(*straight, range(STEPS))
    first = start()
    train(*first, range(STEPS // 2))
    save(state(*first), checkpoint_id=folder)
    second = start()
    saved = state(*second)
    load(saved, checkpoint_id=folder)
    set_model_state_dict(second[0], saved["model"])
    set_optimizer_state_dict(second[0], second[1], saved["optim"])
    second[2].load_state_dict(saved["plasticity"])
    train(*second, range(STEPS // 2, STEPS))
    for handle in (straight[2], second[2]):
        handle.merge_samples()  # each process's counts and memory, combined
    a, b = straight[2].report(), second[2].report()
    same = all(torch.equal(full(straight[0])[n], w) for n, w in full(second[0]).items())
    out = {"same_weights": same, "straight": figures(a), "resumed": figures(b)}
    if case == "checkpoint-caching":
        out["energy"] = [a.energy, b.energy]
        out["transient"] = [a.transient, b.transient]
        return out
    memory = [h.plasticity.samples.memory.state_dict() for h in (straight[2], second[2])]
    out["same_memory"] = all(
        np.array_equal(np.asarray(memory[0][k]), np.asarray(memory[1][k])) for k in memory[0]
    )
    return out


def selections(case: str, rank: int) -> dict:
    """The distributed top-k against the NumPy core's on the whole vector: values with
    heavy ties (5 levels), each process holding its rows of 1001, 3 and 1 entries."""
    from energy_callbacks.core.ops import numpy_ops
    from energy_callbacks.torch.sharded_ops import ShardedOps
    from energy_callbacks.torch.shards import Shards, rows

    ops = ShardedOps(numpy_ops, Shards(dist.group.WORLD))
    g = torch.Generator().manual_seed(4)
    asked = []  # every selection of the step first, then all run together
    for n in (1001, 3, 1):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            whole = torch.randint(0, 5, (n,), generator=g).to(dtype) / 4
            start, stop = rows(n, rank, dist.get_world_size())
            for k in sorted({1, n // 3, n // 2, n - 1, n}):
                for largest in (True, False):
                    got = ops._select(whole[start:stop].clone(), n, k, largest)
                    want = numpy_ops.top_k_mask(whole.float().numpy()[None], k, largest)[0]
                    asked.append((got, want[start:stop]))
    ops.resolve()
    agree = sum(
        int(np.array_equal((got if torch.is_tensor(got) else got.mask).numpy(), want))
        for got, want in asked
    )
    return {"agree": agree, "tried": len(asked)}


def refusals(case: str, rank: int) -> dict:
    """What sharded parameters refuse, with the messages."""
    out = {}
    for name, kwargs in {
        "units-without-adjacency": dict(plasticity=Plasticity(units=TopUnits(0.25))),
        "caching": dict(
            plasticity=Plasticity(caching=Caching(1e-3, float("inf"), 0.1, scope="layer_sum"))
        ),
    }.items():
        torch.manual_seed(0)
        model = shard(classifier())
        try:
            attach(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
            out[name] = None
        except ValueError as exc:
            out[name] = str(exc)
    return out


def main() -> None:
    out = Path(sys.argv[1])
    cases = sys.argv[2].split(",")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {
        case: (
            rule_case
            if case in RULES
            else refusals
            if case == "refusals"
            else checkpointed
            if case.startswith("checkpoint")
            else selections
            if case == "selections"
            else run
        )(case, rank)
        for case in cases
    }
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown of worker threads (gloo, numba) at exit


if __name__ == "__main__":
    main()
