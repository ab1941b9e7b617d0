"""Bring the plasticity state back from spawned worker processes (``ddp_spawn``).

Under ``strategy="ddp_spawn"`` (and ``ddp_fork``/``ddp_notebook``) Lightning trains
in child processes, each with its own copy of the callback, and sends back only
the weights and ``trainer.callback_metrics``. :class:`WorkerResult` sends the
rest: rank 0's child writes the state (plain tensors, loaded with
``weights_only=True``) to a file named after the process and the object that
made the callback, and that object reads it the first time it is asked for a
report. Only a child started by the ``multiprocessing`` module of the process
that made the callback writes it, so a callback pickled elsewhere writes nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import TensorSpec


class WorkerResult:
    """The channel from a spawned worker's copy of a callback to the original."""

    def __init__(self, owner: object) -> None:
        self.origin = (os.getpid(), id(owner))

    @property
    def path(self) -> Path:
        pid, ident = self.origin
        return Path(tempfile.gettempdir()) / f"energy_callbacks-{pid}-{ident}.pt"

    def in_worker(self) -> bool:
        """True in a child process that the callback's own process started."""
        parent = multiprocessing.parent_process()
        return parent is not None and parent.pid == self.origin[0] != os.getpid()

    def send(self, specs: Sequence[TensorSpec], state: dict[str, Any]) -> None:
        """Write the tensors' descriptions and the state (``state`` holds tensors, not
        NumPy arrays); the file appears whole or not at all."""
        described = [[s.name, list(s.shape), s.unit_axis, s.input_axis, s.layer] for s in specs]
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        torch.save({"specs": described, "state": state}, partial)
        os.replace(partial, self.path)

    def receive(self) -> tuple[list[TensorSpec], dict[str, Any]] | None:
        """What a worker sent, once (the file is removed); None if nothing came."""
        path = self.path
        if os.getpid() != self.origin[0] or not path.is_file():
            return None
        try:
            sent = torch.load(path, weights_only=True)
        finally:
            path.unlink(missing_ok=True)
        specs = [TensorSpec(n, tuple(s), u, i, layer) for n, s, u, i, layer in sent["specs"]]
        return specs, sent["state"]
