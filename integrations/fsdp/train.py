"""A plain PyTorch loop sharded with FSDP2 (``fully_shard``), plasticity attached.

Each process holds its rows of every weight; ``attach`` masks and measures them
there, and the figures it reports are sums over the processes. A checkpoint
(``torch.distributed.checkpoint``) holds model, optimizer and plasticity, each
process writing its rows. Run on the CPU with 2 processes::

    torchrun --standalone --nproc_per_node 2 integrations/fsdp/train.py --epochs 2
    torchrun --standalone --nproc_per_node 2 integrations/fsdp/train.py --epochs 3 --resume
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from energy_callbacks import Plasticity, TopFraction, TopUnits
from energy_callbacks.data import load_digits, paper_inputs
from energy_callbacks.torch import attach


def digits() -> TensorDataset:
    ds = load_digits(seed=0)
    x, _ = paper_inputs(ds.train.images)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(ds.train.labels))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--out", default="fsdp-run")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")  # "nccl" on GPUs
    rank = dist.get_rank()

    data = digits()
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)
    # --8<-- [start:loop]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    rules = Plasticity(units=TopUnits(0.5, path=True), synapses=TopFraction(0.1), samples="lazy")
    # unit rules on shards take the wiring as given: (pre, post) module names
    handle = attach(model, optimizer, rules, adjacency=[("0", "2")])

    def state(epoch: int) -> dict:
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "plasticity": handle.state_dict(),  # a collective: every process calls it
            "epoch": torch.tensor(epoch),
        }

    first = 0
    folder = Path(args.out)
    if args.resume:  # from the newest epoch's checkpoint
        newest = max(folder.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
        saved = state(0)
        dcp.load(saved, checkpoint_id=newest)
        set_model_state_dict(model, saved["model"])
        set_optimizer_state_dict(model, optimizer, saved["optimizer"])
        handle.load_state_dict(saved["plasticity"])
        first = int(saved["epoch"]) + 1
    for epoch in range(first, args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            handle.gate_batch(yb)
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        handle.merge_samples()  # the samples of every process, counted together
        report = handle.report()  # a collective too
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.3f}, {report}")
        dcp.save(state(epoch), checkpoint_id=folder / f"epoch-{epoch}")
    # --8<-- [end:loop]
    report = handle.report()
    rows = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
    handle.detach()
    dist.destroy_process_group()
    return {"report": report, "rows": rows, "rank": rank}


if __name__ == "__main__":
    result = main()
    if result["rank"] == 0:
        print("rows held by process 0:", result["rows"])
    os._exit(0)  # worker threads (gloo) need no teardown
