"""The mistake memory: one persistent flag per sample id, bounded in memory.

Ids below the *dense extent* are bits of a bitmap (1 bit per id: 1e8 ids take
12.5 MB). The bitmap grows to cover a new id only while it stays small next to
what it holds: at most :data:`DENSE_FLOOR_BYTES` (16 MiB, 1.3e8 ids), or 16
bytes per flagged id beyond that. An id past that (a hash, or ``1e12`` in a data
set of 1e5 samples) is kept in a sorted array of flagged ids instead, 8 bytes
each. So the memory never holds more than ``max(16 MiB, 16 B x flagged) + 8 B x
flagged``, whatever the ids are.

Example::

    >>> m = MistakeMemory()
    >>> m.set([3, 10**12])
    >>> m.get([3, 4, 10**12]).tolist(), m.count(), m.nbytes < 100
    ([True, False, True], 2, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

DENSE_FLOOR_BYTES = 1 << 24
"""The bitmap may always grow to this many bytes (16 MiB: ids below 134,217,728)."""

DENSE_BYTES_PER_FLAG = 16
"""Past the floor, the bitmap may hold this many bytes per flagged id."""

GROWTH = 1.125
"""The bitmap grows by at least this factor (amortized copies, at most 12.5% slack)."""


class MistakeMemory:
    """One persistent bit per sample id: "was misclassified at some presentation".

    ``merge`` ORs another memory in (use it to combine data-parallel ranks).
    ``state_dict`` holds the packed bitmap (uint8) and the ids beyond it (int64).
    ``len()`` and ``size`` are one past the largest flagged id.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._bits = np.zeros(0, dtype=np.uint8)
        self._dense = 0  # ids below this live in the bitmap
        self._sparse = np.zeros(0, dtype=np.int64)  # flagged ids >= _dense, sorted, unique
        self._count = 0
        self.size = 0
        if capacity is not None:  # the ids are known to lie below it: one exact bitmap
            self._extend(min(capacity, 8 * DENSE_FLOOR_BYTES), exact=True)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """The bytes the memory holds (bitmap and sparse ids)."""
        return int(self._bits.nbytes + self._sparse.nbytes)

    # -- ids ---------------------------------------------------------------
    @staticmethod
    def _ids(ids: Any) -> np.ndarray:
        arr: np.ndarray = np.asarray(ids)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"MistakeMemory: sample ids must be integers >= 0 (keys into the mistake "
                f"memory), got dtype {arr.dtype}; give the batch integer ids such as the "
                "dataset index"
            )
        low, high = arr.min(), arr.max()
        if low < 0 or high >= np.iinfo(np.int64).max:
            bad = low if low < 0 else high
            raise ValueError(
                f"MistakeMemory: sample id {int(bad)} is outside [0, 2**63 - 1); ids must be "
                "integers >= 0 (the dataset index)"
            )
        return arr.astype(np.int64).ravel()

    def _allowance(self, flagged: int) -> int:
        """How many ids the bitmap may cover with ``flagged`` flags in the memory."""
        return 8 * max(DENSE_FLOOR_BYTES, DENSE_BYTES_PER_FLAG * flagged)

    def _extend(self, dense: int, exact: bool = False) -> None:
        """Cover ids below ``dense`` with the bitmap; flagged sparse ids move into it."""
        if dense <= self._dense:
            return
        need = (dense + 7) // 8
        if need > self._bits.size:
            size = need if exact else max(need, int(self._bits.size * GROWTH))
            bigger = np.zeros(size, dtype=np.uint8)
            bigger[: self._bits.size] = self._bits
            self._bits = bigger
        self._dense = 8 * self._bits.size
        moving = self._sparse[self._sparse < self._dense]
        if moving.size:
            self._sparse = self._sparse[moving.size :]
            np.bitwise_or.at(self._bits, moving >> 3, (1 << (moving & 7)).astype(np.uint8))

    def get(self, ids: Any) -> np.ndarray:
        """The flags of ``ids`` (False for ids never flagged)."""
        ids = self._ids(ids)
        flags = np.zeros(ids.shape, dtype=bool)
        dense = ids < self._dense
        k = ids[dense]
        flags[dense] = (self._bits[k >> 3] >> (k & 7).astype(np.uint8)) & 1 == 1
        if self._sparse.size and not dense.all():
            far = ids[~dense]
            at = np.minimum(np.searchsorted(self._sparse, far), self._sparse.size - 1)
            flags[~dense] = self._sparse[at] == far
        return flags

    def set(self, ids: Any) -> None:
        """Flag ``ids`` (repeated ids are one flag)."""
        ids = self._ids(ids)
        if ids.size == 0:
            return
        new = _sorted_unique(ids[~self.get(ids)])
        if new.size == 0:
            return
        self._count += int(new.size)
        self.size = max(self.size, int(new[-1]) + 1)
        allowance = self._allowance(self._count)
        reach = new[new < allowance]
        if reach.size:
            self._extend(int(reach[-1]) + 1)
        dense = new[new < self._dense]
        np.bitwise_or.at(self._bits, dense >> 3, (1 << (dense & 7)).astype(np.uint8))
        far = new[dense.size :]
        if far.size:
            self._sparse = _sorted_unique(np.concatenate([self._sparse, far]))

    def count(self) -> int:
        """How many samples are flagged."""
        return self._count

    def flagged(self) -> np.ndarray:
        """The flagged ids, sorted: the replay buffer memorized-mistake gating needs."""
        bits = np.unpackbits(self._bits, bitorder="little")
        return np.concatenate([np.flatnonzero(bits).astype(np.int64), self._sparse])

    def merge(self, other: MistakeMemory | Mapping[str, Any]) -> None:
        """OR another memory (or its state_dict) into this one."""
        if not isinstance(other, MistakeMemory):
            mem = MistakeMemory()
            mem.load_state_dict(other)
            other = mem
        if other._dense <= self._allowance(self._count + other._count):
            self._extend(other._dense)
            n = other._bits.size
            before = np.unpackbits(self._bits[:n]).sum(dtype=np.int64)
            self._bits[:n] |= other._bits
            self._count += int(np.unpackbits(self._bits[:n]).sum(dtype=np.int64) - before)
            self.size = max(self.size, min(other.size, other._dense))
        else:  # the other's bitmap is too sparse for this one: take its flags in chunks
            chunk = 8 << 20
            for start in range(0, other._bits.size, chunk):
                part = np.unpackbits(other._bits[start : start + chunk], bitorder="little")
                self.set(np.flatnonzero(part).astype(np.int64) + 8 * start)
        self.set(other._sparse)

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        dense = min(self.size, self._dense)
        return {
            "bits": self._bits[: (dense + 7) // 8].copy(),
            "size": self.size,
            "sparse": self._sparse.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bits = np.asarray(state["bits"], dtype=np.uint8).ravel().copy()
        size = int(state["size"])
        sparse = np.asarray(state.get("sparse", np.zeros(0)), dtype=np.int64).ravel()
        dense = size if sparse.size == 0 else 8 * bits.size
        if bits.size != (dense + 7) // 8 or (sparse.size and int(sparse[-1]) + 1 != size):
            raise ValueError(
                f"MistakeMemory: a state of {bits.size} bytes and {sparse.size} sparse ids "
                f"cannot hold size={size} flags; the checkpoint is corrupt"
            )
        if sparse.size and (
            int(sparse[0]) < dense or (sparse.size > 1 and not (np.diff(sparse) > 0).all())
        ):
            raise ValueError(
                "MistakeMemory: the sparse ids of the state are not sorted past the bitmap; "
                "the checkpoint is corrupt"
            )
        if dense % 8:  # bits past `dense` are padding: clear them
            bits[-1] &= np.uint8((1 << (dense % 8)) - 1)
        self._bits, self._dense, self._sparse, self.size = bits, 8 * bits.size, sparse.copy(), size
        self._count = int(np.unpackbits(bits).sum(dtype=np.int64)) + int(sparse.size)


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    """``np.unique`` by a sort (NumPy 2's hashing unique is slower on id batches)."""
    out = np.sort(ids)
    if out.size > 1:
        out = out[np.concatenate([[True], out[1:] != out[:-1]])]
    return out
