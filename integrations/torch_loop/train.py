"""A plain PyTorch training loop with energy-saving plasticity attached.

The model, optimizer and loop are ordinary PyTorch (Adam, cross-entropy,
mini-batches on scikit-learn's bundled digits). ``attach`` adds the rules to
the optimizer's steps; the loop's only addition is ``gate_batch``, which tells
the sample gate the targets of the batch whose forward pass comes next. Run::

    python integrations/torch_loop/train.py --epochs 5
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from energy_callbacks import Plasticity, TopFraction, TopUnits
from energy_callbacks.data import load_digits, paper_inputs
from energy_callbacks.torch import attach


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Train and test inputs (flattened, centred) and labels as tensors."""
    ds = load_digits(seed=seed)
    x, mean = paper_inputs(ds.train.images)
    x_test, _ = paper_inputs(ds.test.images, mean)
    return (
        torch.from_numpy(x),
        torch.from_numpy(ds.train.labels),
        torch.from_numpy(x_test),
        torch.from_numpy(ds.test.labels),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y, x_test, y_test = digits_tensors()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size, shuffle=True
    )
    # --8<-- [start:loop]
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    rules = Plasticity(units=TopUnits(0.5), synapses=TopFraction(0.1), samples="lazy")
    handle = attach(model, optimizer, rules)  # the one addition, besides gate_batch
    for _epoch in range(args.epochs):
        for xb, yb in loader:
            handle.gate_batch(yb)  # before the forward pass: who may learn from this batch
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # masked; skipped when no sample of the batch was wrong
    report = handle.report()
    handle.detach()  # the optimizer and model are as they were, without the hooks
    print(report)
    # --8<-- [end:loop]
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(
        f"test accuracy {accuracy:.3f}; learned from {report.samples_learned} of "
        f"{report.samples_seen} samples shown"
    )
    return {"report": report, "accuracy": accuracy, "model": model, "optimizer": optimizer}


if __name__ == "__main__":
    main()
