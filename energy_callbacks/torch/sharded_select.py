"""The exact top-k of values split over processes, for all the tensors of a step at once.

Each process holds a contiguous run of every tensor's flat entries (its FSDP2
rows). :class:`Selection` finds the k-th largest value by a radix selection on
the bits of the (non-negative) values: digits of up to :data:`DIGIT_BITS` bits,
the most significant first; each round, each process counts its candidates per
digit, the counts are summed over the processes, and the digit that holds the
k-th value narrows the candidates. The last round's counts are kept per
process, so each process also knows how many values equal to the cut the
earlier processes hold: the ties go to the lowest flat indices, as on one
process.

Selections are not computed when a rule asks for them: :class:`LazyMask` stands
for the mask until something reads it, and then :func:`resolve` runs every
pending selection of the step together, one summed vector per round for all of
them. A float32 step thus costs 3 collectives, whatever the number of tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .shards import Shards

DIGIT_BITS = 11
"""The widest digit: a float32 key (31 bits) takes 3 rounds, each at most 2048
counts per selection (the last round's per process)."""

_KEYS = {8: torch.int64, 4: torch.int32, 2: torch.int16}  # key dtype per float width


def digits(bits: int, most: int = DIGIT_BITS) -> list[tuple[int, int]]:
    """``(shift, width)`` of the digits of a ``bits``-bit key, the most significant
    first, in as few rounds of at most ``most`` bits as can be."""
    rounds = -(-bits // most)
    widths = [bits // rounds + (1 if i < bits % rounds else 0) for i in range(rounds)]
    out, shift = [], bits
    for w in widths:
        shift -= w
        out.append((shift, w))
    return out


class Selection:
    """The ``k`` largest (or smallest) of ``n`` values >= 0 split over the processes;
    this process holds ``values`` (flat). :attr:`mask` is set once resolved."""

    def __init__(self, values: torch.Tensor, k: int, largest: bool, shards: Shards) -> None:
        keys = values.contiguous().view(_KEYS[values.element_size()])  # >= 0: bits order
        if not largest:  # the smallest values get the largest keys
            keys = torch.iinfo(keys.dtype).max - keys
        self.keys, self.matching = keys, keys
        self.shards = shards
        self.need = k  # how many to take among the keys that match the prefix so far
        self.prefix = 0
        self.rounds = digits(8 * values.element_size() - 1)  # the sign bit is 0
        self.round = 0
        self.mask: torch.Tensor | None = None

    @property
    def last(self) -> bool:
        return self.round == len(self.rounds) - 1

    def counts(self) -> np.ndarray:
        """This round's counts per digit of this process's candidates (on the last
        round, in this process's row of a processes x digits matrix), flat."""
        shift, bits = self.rounds[self.round]
        bins = 1 << bits
        local = (
            torch.bincount(((self.matching >> shift) & (bins - 1)).to(torch.int64), minlength=bins)
            .cpu()
            .numpy()
        )
        if not self.last:
            return local
        rows = np.zeros((self.shards.world, bins), dtype=np.int64)
        rows[self.shards.rank] = local
        return rows.reshape(-1)

    def advance(self, summed: np.ndarray) -> None:
        """Narrow to the digit of the k-th value, given this round's counts summed over
        the processes; on the last round, write the mask."""
        shift, bits = self.rounds[self.round]
        bins = 1 << bits
        rows = summed.reshape(self.shards.world, bins) if self.last else None
        hist = summed if rows is None else rows.sum(0)
        above = np.cumsum(hist[::-1])  # counts of the digits >= bins - 1, bins - 2, ...
        d = bins - 1 - int(np.searchsorted(above, self.need))  # the k-th value's digit
        self.need -= int(above[bins - 1 - d] - hist[d])  # minus those with a larger digit
        self.prefix = (self.prefix << bits) | d
        if rows is None:
            self.matching = self.matching[((self.matching >> shift) & (bins - 1)) == d]
            self.round += 1
            return
        cut = torch.tensor(self.prefix, dtype=self.keys.dtype, device=self.keys.device)
        mask = self.keys > cut
        before = int(rows[: self.shards.rank, d].sum())  # ties held by earlier processes
        take = min(int(rows[self.shards.rank, d]), max(0, self.need - before))
        if take:
            mask[torch.nonzero(self.keys == cut).reshape(-1)[:take]] = True
        self.mask = mask
        self.keys = self.matching = None  # type: ignore[assignment]


def resolve(pending: list[Selection]) -> None:
    """Run ``pending`` selections to their masks together: one sum over the processes
    per round for all of them (every process resolves the same selections in the same
    order)."""
    active = list(pending)
    while active:
        parts = [s.counts() for s in active]
        summed = active[0].shards.sum(np.concatenate(parts))
        bounds = np.cumsum([p.size for p in parts])[:-1]
        for s, part in zip(active, np.split(summed, bounds), strict=True):
            s.advance(part)
        active = [s for s in active if s.mask is None]


class LazyMask:
    """A selection's mask before it is computed, seen in ``shape``, as a NumPy array
    (``numpy``) or a tensor; :meth:`value` resolves the step's pending selections."""

    def __init__(self, owner: Any, selection: Selection, shape: tuple[int, ...], numpy: bool):
        self.owner, self.selection = owner, selection
        self.shape, self.numpy = tuple(shape), numpy
        self.dtype = np.dtype(bool) if numpy else torch.bool

    def reshaped(self, shape: tuple[int, ...]) -> LazyMask:
        return LazyMask(self.owner, self.selection, shape, self.numpy)

    def value(self) -> Any:
        if self.selection.mask is None:
            self.owner.resolve()
        mask = self.selection.mask
        assert mask is not None
        return mask.numpy().reshape(self.shape) if self.numpy else mask.reshape(self.shape)
