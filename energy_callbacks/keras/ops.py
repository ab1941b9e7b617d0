""":class:`~energy_callbacks.core.ops.ArrayOps` on ``keras.ops``: the rules, in-graph.

The core rules call these at trace time inside the compiled train step, so the
masks run on whichever backend Keras uses (TensorFlow, JAX, torch), under
``jit_compile`` and ``steps_per_execution``. Static sizes (``k``) stay Python
ints; everything that depends on the step's values is a tensor.

Exact top-k keeps the core's tie rule (the lower flat index wins) without a
scatter, which is a Python loop on the torch backend: ``t`` is the k-th largest
value from ``top_k``; entries above ``t`` are kept, and entries equal to ``t``
are kept in index order, by a cumulative count, until there are ``k``.
Reductions are float32 (JAX runs without x64); the adapter folds them into
exact totals (see :mod:`energy_callbacks.keras.optimizer`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from ..core.ops import APPROX_SAMPLE, approx_stride


class Difference:
    """A step's ``after - before``, unwritten (the adapter's proposals on TensorFlow and
    JAX, :meth:`KerasOps.deferred`), and zero outside ``keep`` when a rule masked it
    (:meth:`KerasOps.keep`: what the next rule ranks).

    Each pass reads it from the two arrays the step holds anyway: XLA fuses the
    subtraction (and the mask) into the pass, and the exact top fraction's counting
    loop recomputes it at every round, so no tensor of ``|dw|`` (or its bits) lives
    through the loop.
    """

    def __init__(
        self,
        after: Array,
        before: Array,
        shape: tuple[int, ...] | None = None,
        keep: Array | None = None,
    ):
        self.after, self.before = after, before
        self.shape = tuple(int(d) for d in (after.shape if shape is None else shape))
        self.keep = keep  # flat boolean, or None: all of it

    def dense(self) -> Array:
        """``after - before`` (where kept) in its shape, as an expression of the step."""
        d = self.after - self.before
        if self.keep is not None:
            d = ops.where(ops.reshape(self.keep, d.shape), d, ops.zeros_like(d))
        return ops.reshape(d, self.shape)

    def flat(self) -> tuple[Array, Array, Array | None]:
        """``after``, ``before`` and ``keep`` (or None), flat."""
        return ops.reshape(self.after, (-1,)), ops.reshape(self.before, (-1,)), self.keep

    def reshaped(self, shape: tuple[int, ...]) -> Difference:
        return Difference(self.after, self.before, shape, self.keep)

    def masked(self, mask: Array) -> Difference:
        """This difference, zero where ``mask`` (in its shape) is False."""
        flat = ops.reshape(mask, (-1,))
        keep = flat if self.keep is None else ops.logical_and(self.keep, flat)
        return Difference(self.after, self.before, self.shape, keep)


def _dense(x: Any) -> Array:
    return x.dense() if isinstance(x, Difference) else x


_EXACT_FLOAT_COUNT = 1 << 24
"""Below this many entries a float32 sum of 0/1 values is an exact count."""

Array = Any


class KerasOps:
    """The array operations the core rules use, as symbolic ``keras.ops`` calls."""

    def abs(self, x: Array) -> Array:
        return ops.abs(_dense(x))

    def magnitude(self, x: Array) -> Array:
        return ops.abs(_dense(x))

    def isfinite_all(self, x: Array) -> Array:
        return ops.all(ops.isfinite(_dense(x)))

    def total(self, x: Array, alpha: float = 1.0) -> Array:
        a = ops.abs(_dense(x))
        return ops.sum(a if alpha == 1.0 else ops.power(a, alpha))

    def count_nonzero(self, x: Array) -> Array:
        return _count(ops.not_equal(_dense(x), 0))

    def row_l1(self, x: Array, axis: int) -> Array:
        x = _dense(x)
        others = tuple(d for d in range(len(x.shape)) if d != axis)
        return ops.sum(ops.abs(x), axis=others) if others else ops.abs(x)

    def row_max(self, x: Array, axis: int) -> Array:
        x = _dense(x)
        others = tuple(d for d in range(len(x.shape)) if d != axis)
        return ops.max(ops.abs(x), axis=others) if others else ops.abs(x)

    def top_k_mask(self, scores: Array, k: Any, largest: bool = True) -> Array:
        if len(scores.shape) != 2:
            raise ValueError(f"top_k_mask expects a 2-D array, got shape {scores.shape}")
        if not isinstance(k, (int, np.integer)):
            raise ValueError("KerasOps.top_k_mask: k must be one int for every row")
        rows, n = (int(d) for d in scores.shape)
        k = min(int(k), n)
        if k >= n:
            return ops.ones(scores.shape, dtype="bool")
        if k <= 0:
            return ops.zeros(scores.shape, dtype="bool")
        if rows == 1 and largest and n > _search_above():
            search = _xla(_search_top)
            return ops.reshape(search(ops.reshape(scores, (n,)), None, k), (1, n))
        s = scores if largest else ops.negative(scores)
        values, _ = ops.top_k(s, k, sorted=True)
        return _keep_above(s, values[:, k - 1 : k], k)

    def approx_top_mask(self, scores: Array, k: int) -> Array:
        n = int(scores.shape[0])
        if n <= APPROX_SAMPLE or k <= 0 or k >= n:
            return ops.reshape(self.top_k_mask(ops.reshape(scores, (1, n)), k), (n,))
        return _xla(_approx_top)(scores, k)

    def top_magnitude_mask(self, x: Array, k: int, approximate: bool = False) -> Array:
        n = int(np.prod(x.shape))
        if isinstance(x, Difference) and not approximate and 0 < k < n > _search_above():
            a, b, keep = x.flat()
            return _xla(_search_top)(a, b, k, keep, row_width(x.after.shape))
        s = ops.abs(_dense(x))
        if approximate:
            return self.approx_top_mask(s, k)
        return ops.reshape(self.top_k_mask(ops.reshape(s, (1, n)), k), (n,))

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        return x.reshaped(shape) if isinstance(x, Difference) else ops.reshape(x, shape)

    def moveaxis(self, x: Array, source: int, destination: int) -> Array:
        x = _dense(x)
        return x if source == destination else ops.moveaxis(x, source, destination)

    def expand_units(self, unit_mask: Array, shape: tuple[int, ...], axis: int) -> Array:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return ops.broadcast_to(ops.reshape(unit_mask, view), shape)

    def logical_and(self, a: Array, b: Array) -> Array:
        return ops.logical_and(a, b)

    def logical_or(self, a: Array, b: Array) -> Array:
        return ops.logical_or(a, b)

    def logical_not(self, a: Array) -> Array:
        return ops.logical_not(a)

    def add(self, a: Array, b: Array) -> Array:
        return ops.add(a, b)

    def scale(self, x: Array, factor: float) -> Array:
        dtype = keras.backend.standardize_dtype(x.dtype)
        return ops.multiply(x, ops.convert_to_tensor(np.asarray(factor, dtype=dtype)))

    def ones_mask(self, shape: tuple[int, ...]) -> Array:
        return ops.ones(shape, dtype="bool")

    def zeros_like(self, x: Array) -> Array:
        return ops.zeros_like(_dense(x))

    def deferred(self, x: Array) -> bool:
        return isinstance(x, Difference)

    def keep(self, x: Array, mask: Array, out: Array | None = None) -> Array:
        if isinstance(x, Difference):  # still unwritten: each pass applies the mask
            return x.masked(mask)
        return ops.where(mask, x, ops.zeros_like(x))

    def greater_equal(self, x: Array, threshold: float) -> Array:
        # compare in float64 on the host-side constant's terms: round the threshold up
        # to the dtype so "x >= t" holds exactly as real numbers
        dtype = keras.backend.standardize_dtype(x.dtype)
        t = np.asarray(threshold, dtype=dtype)
        if float(t) < threshold:
            t = np.nextafter(t, np.asarray(np.inf, dtype=dtype))
        return ops.greater_equal(x, ops.convert_to_tensor(t, dtype=dtype))

    def from_numpy(self, x: np.ndarray) -> Array:
        return ops.convert_to_tensor(x)

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(x))

    def concat(self, xs: list[Array], axis: int) -> Array:
        return ops.concatenate(xs, axis=axis)

    def split(self, x: Array, sizes: list[int], axis: int) -> list[Array]:
        bounds = np.cumsum(sizes)[:-1].tolist()
        return list(ops.split(x, bounds, axis=axis)) if bounds else [x]

    def argmax(self, x: Array) -> Array:
        return ops.cast(ops.argmax(x, axis=-1), "int32")

    def class_probability(self, outputs: Array, labels: Array, from_logits: bool) -> Array:
        probs = ops.softmax(outputs, axis=-1) if from_logits else outputs
        onehot = ops.one_hot(ops.cast(labels, "int32"), int(outputs.shape[-1]))
        return ops.sum(probs * ops.cast(onehot, probs.dtype), axis=-1)


SEARCH_ABOVE = {"jax": 512, "tensorflow": 512}
"""Longer 1-D selections use the bit search: XLA sorts slowly on CPU (``top_k`` over 10k
values took 2 ms). The masked step runs under XLA on both (see :func:`xla_on_tensorflow`).
The torch backend always uses ``top_k``."""
FLOAT_BITS_END = 0x7F800001
"""One past the bit pattern of +inf: every finite score ``>= 0`` lies below it."""


def _search_above() -> int | float:
    return SEARCH_ABOVE.get(keras.backend.backend(), float("inf"))


def xla_on_tensorflow(fn: Callable[..., Array]) -> Callable[..., Array]:
    """``fn`` compiled with XLA on TensorFlow, whose Keras steps run without XLA on CPU:
    there every op is a pass of its own and a ``while_loop`` pays per op per iteration
    (3x slower here). ``fn`` itself on the other backends (JAX compiles the whole step).

    While ``fn`` is traced, reductions over a tensor take XLA's variadic reduction
    (:func:`_reduces_in_rows`). ``fn`` is traced as written (no AutoGraph): its loops
    and branches are ``keras.ops``' own, as on JAX."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        depth = getattr(_XLA_TRACE, "depth", 0)
        _XLA_TRACE.depth = depth + 1
        try:
            return fn(*args)
        finally:
            _XLA_TRACE.depth = depth

    return tf.function(  # type: ignore[no-any-return]
        tf.autograph.experimental.do_not_convert(traced), jit_compile=True
    )


_XLA_TRACE = threading.local()  # depth of xla_on_tensorflow's traces on this thread


def _reduces_in_rows() -> bool:
    """True where :func:`_reduce_over_slices` reduces rows by variadic reductions: JAX,
    and TensorFlow inside :func:`xla_on_tensorflow`. A Keras step on TensorFlow
    outside it runs TensorFlow's own kernels, which have no variadic reduction."""
    backend = keras.backend.backend()
    return backend == "jax" or (backend == "tensorflow" and getattr(_XLA_TRACE, "depth", 0) > 0)


_xla = functools.cache(xla_on_tensorflow)


def compiled_step(fn: Callable[..., Any], restricts: bool) -> Callable[..., Any]:
    """The optimizer's masked step, compiled where that pays.

    TensorFlow: with XLA when it masks (XLA fuses the masks' passes; measuring alone
    runs faster in TF's own kernels). JAX: ``jax.jit`` always, so that a fit with
    ``jit_compile=False`` runs the selection's loops compiled once rather than
    tracing and compiling them again at every step (0.8-1 s a step). torch: ``fn``.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)  # type: ignore[no-any-return]
    if backend == "tensorflow" and restricts:
        return xla_on_tensorflow(fn)
    return fn


MEASURE_CHUNK = 1 << 22
"""Entries per slice of :func:`change_totals` (16 MiB of float32)."""


def change_totals(
    after: Array, before: Array, alpha: float, mask: Array | None = None
) -> tuple[Array, Array, Array, Array]:
    """``(sum |c|, count(c != 0), sum |c| ** alpha, sum |d|)`` of ``d = after - before``
    and ``c = d`` where ``mask`` (all of it without one), summed without writing a
    difference of the whole tensor (:func:`_reduce_over_slices`). The last figure is
    finite exactly when ``d`` is, masked out or not. A ``mask`` is for compiled
    backends: eager torch masks the proposal it has written (the masked step)."""
    if keras.backend.backend() == "torch":
        if mask is not None:
            raise ValueError("change_totals: a mask on torch; sum the written proposal")
        m1, m0, m_alpha = _torch_change_totals(after, before, alpha)
        return m1, m0, m_alpha, m1
    a, b = ops.reshape(after, (-1,)), ops.reshape(before, (-1,))
    keep = None if mask is None else ops.reshape(mask, (-1,))

    def values(a: Array, b: Array, keep: Array | None) -> tuple[Array, ...]:
        m = ops.abs(a - b)
        c = m if keep is None else ops.where(keep, m, ops.zeros_like(m))
        extra = () if alpha == 1.0 else (ops.power(c, alpha),)
        return (c, ops.not_equal(c, 0), *extra, *(() if keep is None else (m,)))

    zero = ops.zeros((), "float32")
    zeros = (zero, ops.zeros((), "int32")) + (() if alpha == 1.0 else (zero,))
    m1, m0, *rest = _reduce_over_slices(
        values, (a, b, keep), zeros + ((zero,) if keep is not None else ()), row_width(after.shape)
    )
    m_alpha = m1 if alpha == 1.0 else rest.pop(0)
    return m1, m0, m_alpha, rest[0] if rest else m1


SUM, MIN, MAX = "sum", "min", "max"
"""How :func:`_reduce_over_slices` reduces a figure: float32 values and boolean flags
(counted) are summed; int32 values can also take their least or greatest."""


def _reduce_over_slices(
    values: Callable[..., tuple[Array, ...]],
    arrays: tuple[Array | None, ...],
    inits: tuple[Array, ...],
    row: int = 0,
    kinds: tuple[str, ...] = (),
) -> tuple[Array, ...]:
    """The reductions of ``values(*arrays)`` over the 1-D ``arrays`` (None stays None):
    ``values`` gives elementwise figures, each reduced as its ``kinds`` entry says
    (:data:`SUM` when not given); ``inits`` give the reductions' dtypes and starting
    values (0 for a sum, the identity for a least or greatest). No figure is written
    for a whole tensor.

    JAX, and TensorFlow under XLA, reduce the figures a row at a time
    (:func:`_row_reductions`; ``row`` entries per row, from :func:`row_width`, or
    :data:`_ROW`). Elsewhere (TensorFlow's own kernels) a loop over slices of
    :data:`MEASURE_CHUNK` entries: XLA's CPU backend reduces through library calls
    that read a written input, and with slices side by side in one graph its
    scheduler kept them all alive (about 2x the tensor for ``Threshold`` on
    TensorFlow); a loop holds one slice's."""
    kinds = kinds or (SUM,) * len(inits)
    n = int(next(x for x in arrays if x is not None).shape[0])
    if _reduces_in_rows():
        return _row_reductions(values, arrays, inits, row or _ROW, kinds)

    def reduced(*slices: Array | None) -> tuple[Array, ...]:
        return tuple(_reduce(v, kind) for v, kind in zip(values(*slices), kinds, strict=True))

    if one_slice(n):
        return tuple(ops.cast(r, i.dtype) for r, i in zip(reduced(*arrays), inits, strict=True))

    def add(start: Any, size: int, acc: tuple[Array, ...]) -> tuple[Array, ...]:
        part = reduced(*(None if x is None else cut(x, start, size) for x in arrays))
        return tuple(
            _COMBINE[kind](r, ops.cast(p, r.dtype))
            for r, p, kind in zip(acc, part, kinds, strict=True)
        )

    return over_slices(n, add, inits)  # type: ignore[no-any-return]


_COMBINE = {SUM: ops.add, MIN: ops.minimum, MAX: ops.maximum}


def _reduce(x: Array, kind: str) -> Array:
    """``x`` reduced whole as ``kind`` says (a sum counts boolean flags, :func:`_total`)."""
    if kind == SUM:
        return _total(x)
    return ops.min(x) if kind == MIN else ops.max(x)


def _total(x: Array) -> Array:
    """The sum of float values, or the count of boolean flags (int32)."""
    return _count(x) if x.dtype == "bool" else ops.sum(x)


_ROW = 1024
"""Entries per row of :func:`_row_reductions` unless the tensor's shape gives a row
(:func:`row_width`): a row's float32 sum has a row's rounding,
like a block of a library sum."""


def row_width(shape: tuple[int, ...]) -> int:
    """The row of :func:`_row_reductions` for a tensor of ``shape``: its trailing dimensions,
    as many as make at least 256 entries, when they make at most 8192 (else 0, for
    :data:`_ROW`). A mask broadcast along an axis of the tensor (a unit rule's) then
    lines up with the rows; read in rows of another length, each entry's place in
    the mask took a division, and a pass over the paper MLP's kernel took 5x longer
    (JAX, 784k entries: 1.3 ms against 0.25)."""
    width = 1
    for d in reversed(tuple(int(d) for d in shape)):
        width *= d
        if width >= 256:
            break
    return width if 256 <= width <= 8192 else 0


def _row_reductions(
    values: Callable[..., tuple[Array, ...]],
    arrays: tuple[Array | None, ...],
    inits: tuple[Array, ...],
    row: int,
    kinds: tuple[str, ...],
) -> tuple[Array, ...]:
    """:func:`_reduce_over_slices` under XLA: the arrays seen as rows of ``row``
    entries, the figures of a row reduced by variadic reductions (one per float32
    figure, :func:`_reductions`), then the rows' figures; the last ``n % row`` entries
    apart. XLA fuses ``values`` into each reduction, so nothing is written but one
    figure per row (separate plain reductions of the same values wrote them
    whole: 2x the tensor for a sum and a count). Flags are counted in int32, which
    XLA vectorizes (counted in float32, a pass took 3x longer)."""
    rows, tail = _rows_and_tail(arrays, row)
    out = list(inits)

    def add(figures: Any) -> None:
        for j, r in enumerate(figures):
            out[j] = _COMBINE[kinds[j]](out[j], ops.cast(r, out[j].dtype))

    if rows is not None:
        per_entry = [  # flags counted in int32, values summed in float32, int32 kept
            ops.cast(v, "int32" if v.dtype in ("bool", "int32") else "float32")
            for v in values(*rows)
        ]
        per_row: list[Any] = [None] * len(per_entry)
        for group in _reductions([v.dtype == "float32" for v in per_entry]):
            figures = [per_entry[j] for j in group]
            group_kinds = [kinds[j] for j in group]
            if len(group) == 1 and figures[0].dtype == "float32":
                figures.append(ops.cast(ops.not_equal(figures[0], 0), "int32"))  # see _reductions
                group_kinds.append(SUM)
            reduced = _reduce_rows(figures, group_kinds)
            for j, row_figure in zip(group, reduced, strict=False):
                per_row[j] = row_figure
        add(_reduce(r, kind) for r, kind in zip(per_row, kinds, strict=True))
    if tail is not None:
        add(_reduce(v, kind) for v, kind in zip(values(*tail), kinds, strict=True))
    return tuple(out)


def _rows_and_tail(
    arrays: tuple[Array | None, ...], row: int
) -> tuple[list[Array | None] | None, list[Array | None] | None]:
    """The 1-D ``arrays`` (None stays None) as rows of ``row`` entries, and their last
    ``n % row`` entries apart; either is None when it holds nothing."""
    n = int(next(x for x in arrays if x is not None).shape[0])
    main = n - n % row
    rows = [None if x is None else ops.reshape(x[:main], (-1, row)) for x in arrays]
    tail = [None if x is None else x[main:] for x in arrays]
    return (rows if main else None), (tail if main < n else None)


def _reduce_rows(figures: list[Array], kinds: list[str]) -> tuple[Array, ...]:
    """Each ``(rows, row)`` figure reduced along its rows (as its ``kinds`` entry says)
    by one variadic reduction, into which XLA fuses the figures' expressions."""
    dtypes = [np.dtype(keras.backend.standardize_dtype(v.dtype)) for v in figures]
    inits = [_identity(kind, dtype) for dtype, kind in zip(dtypes, kinds, strict=True)]
    combine = [_COMBINE[kind] for kind in kinds]
    count = len(figures)

    def reducer(*pairs: Any) -> tuple:  # the accumulators, then the values
        return tuple(f(x, y) for f, x, y in zip(combine, pairs[:count], pairs[count:], strict=True))

    if keras.backend.backend() == "jax":
        from jax import lax

        return tuple(lax.reduce(tuple(figures), tuple(inits), lambda x, y: reducer(*x, *y), (1,)))
    # TensorFlow has no public variadic reduction; this is XLA's own op, as TensorFlow
    # wraps it for its XLA ops (checked against TensorFlow 2.21)
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    scalars = [tf.TensorSpec((), v.dtype) for v in figures] * 2
    reduce = tf.function(reducer, autograph=False).get_concrete_function(*scalars)
    return tuple(xla.variadic_reduce(list(figures), [tf.constant(i) for i in inits], [1], reduce))


def _identity(kind: str, dtype: Any) -> np.ndarray:
    """The starting value of a reduction of ``kind`` in ``dtype``."""
    if kind == SUM:
        return np.zeros((), dtype)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    return np.array(info.max if kind == MIN else info.min, dtype)


def _reductions(floats: list[bool]) -> list[list[int]]:
    """The figures of :func:`_row_reductions` (``floats[j]``: figure ``j`` is summed in
    float32, else an int32 count, least or greatest) grouped into variadic reductions
    of at most one float32 figure each, the int32 figures with the first. XLA's CPU
    backend vectorizes such a reduction; one with two float32 figures ran 5x slower
    than two passes of one (784k entries: 0.75 ms against 0.27), and a lone float32
    sum 2x slower than one paired with a count, so a lone float gets a count it does
    not need."""
    counts = [j for j, f in enumerate(floats) if not f]
    groups = [[j] for j, f in enumerate(floats) if f]
    if not groups:
        return [counts]
    groups[0] += counts
    return groups


def over_slices(n: int, step: Callable[[Any, int, Any], Any], carry: Any) -> Any:
    """``carry = step(start, size, carry)`` over ``range(n)`` in slices of
    :data:`MEASURE_CHUNK` entries: the whole slices are the iterations of a loop
    (one slice's temporaries live at a time, and a buffer in the carry is updated in
    place), the tail a call of its own; one call with ``(0, n)`` when ``n`` fits one."""
    if one_slice(n):
        return step(0, n, carry)
    chunk, whole_slices = MEASURE_CHUNK, n // MEASURE_CHUNK
    if keras.backend.backend() == "torch":
        # eager: a Python loop. Keras's fori_loop there flattens the carry through
        # torch's pytree, whose reference cycles keep the carry's buffers (1.0x of
        # a tensor) alive until the garbage collector runs.
        for i in range(whole_slices):
            carry = step(i * chunk, chunk, carry)
    else:
        carry = ops.fori_loop(0, whole_slices, lambda i, c: step(i * chunk, chunk, c), carry)
    done = whole_slices * chunk
    return carry if done == n else step(done, n - done, carry)


def one_slice(n: int) -> bool:
    """True when :func:`over_slices` takes ``n`` entries in one call."""
    return n <= MEASURE_CHUNK


def cut(x: Array, start: Any, size: int) -> Array:
    """``x[start : start + size]`` of a 1-D ``x`` (``x`` itself when that is all of it:
    a slice op would make TensorFlow copy it)."""
    if size == int(x.shape[0]):
        return x
    return ops.slice(x, (start,), (size,))


def put(x: Array, start: Any, value: Array) -> Array:
    """``x`` with ``x[start : start + len(value)] = value`` (``value`` when that is all
    of it). In a loop's carry XLA writes it in place; eager torch writes ``x`` in
    place (Keras's ``slice_update`` there copies ``x``), so ``x`` must be the caller's
    own buffer."""
    size = int(value.shape[0])
    if size == int(x.shape[0]):
        return value
    if keras.backend.backend() == "torch":
        x[start : start + size] = value
        return x
    return ops.slice_update(x, (start,), value)


_SCRATCH: dict[tuple[Any, Any], Any] = {}  # one slice per (device, dtype), reused every step


def _torch_change_totals(after: Array, before: Array, alpha: float) -> tuple[Array, Array, Array]:
    """:func:`change_totals` on torch, eagerly: each slice's difference is written into
    one scratch slice kept for the next step, so a step allocates nothing that scales
    with the model. (Fresh slices of 16 MiB each step raised glibc's mmap threshold
    and left them in its heap: the process grew by 0.7x of the weights' bytes.)"""
    import torch

    a, b = after.detach().reshape(-1), before.detach().reshape(-1)
    key, size = (a.device, a.dtype), min(a.numel(), MEASURE_CHUNK)
    scratch = _SCRATCH.get(key)
    if scratch is None or scratch.numel() < size:  # as large as the largest slice yet
        scratch = _SCRATCH[key] = torch.empty(size, dtype=a.dtype, device=a.device)
    m1 = torch.zeros((), dtype=torch.float64, device=a.device)
    m_alpha = torch.zeros((), dtype=torch.float64, device=a.device)
    m0 = torch.zeros((), dtype=torch.int64, device=a.device)
    for start in range(0, a.numel(), MEASURE_CHUNK):
        end = min(start + MEASURE_CHUNK, a.numel())
        d = torch.sub(a[start:end], b[start:end], out=scratch[: end - start])
        m0 += torch.count_nonzero(d)
        d.abs_()
        m1 += d.sum(dtype=torch.float64)
        if alpha != 1.0:
            m_alpha += d.double().pow_(alpha).sum()
    m1_32 = m1.to(torch.float32)
    return m1_32, m0.to(torch.int32), m1_32 if alpha == 1.0 else m_alpha.to(torch.float32)


def all_finite(grads: list[Any]) -> Array:
    """True when no gradient holds NaN/Inf (a boolean scalar). On torch a float16/32
    gradient is summed in float64, which cannot overflow and is finite exactly when
    every entry is: no boolean copy of the gradient is made."""
    present = [g for g in grads if g is not None]
    if keras.backend.backend() == "torch":
        import torch

        checks = [
            torch.isfinite(g.sum(dtype=torch.float64))
            if g.dtype in (torch.float16, torch.bfloat16, torch.float32)
            else torch.isfinite(g).all()
            for g in present
        ]
        return torch.stack(checks).all()
    return ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in present]))


def _search_top(
    a: Array, b: Array | None, k: int, keep: Array | None = None, row: int = 0
) -> Array:
    """Exact top-``k`` of a long 1-D array of scores ``>= 0`` (``a``), or of ``|a - b|``
    (zero where ``keep`` is False), without a sort; ``row``: the passes' row
    (:func:`row_width` of the tensor's shape; 0 for the default).

    Non-negative float32 values order like their bit patterns read as int32,
    so the cut is found by a search over the bits (:func:`_narrow`): each round
    is one pass that counts the entries at or above its threshold and finds the
    nearest scores either side of it, reading ``a`` and ``b`` (no array of scores
    lives through the loop). The first pass also counts the scores above zero:
    when fewer than ``k`` are (a unit rule's mask keeps whole rows), the cut is at
    zero at once. On arrays long enough for a strided sample to be shorter, the
    sample brackets the cut in that pass too; a missed bracket only narrows less,
    so the result is always exact. Shorter arrays are searched on their bits,
    written once, by counts alone. Ties at the cut are kept in index order
    (:func:`_last_tie`), as the core keeps them.
    """
    n = int(a.shape[0])

    def probe(*ts: Array, nearest: bool = True) -> tuple[tuple[Array, Array, Array], ...]:
        # slice by slice (rows on JAX): a whole tensor's figures would be written
        # (XLA's library reductions read a written input). ``a`` read through a select
        # on the first threshold (never negative): otherwise XLA hoists |a - b| out
        # of the loop and writes it whole.
        def figures(a: Array, b: Array | None, keep: Array | None) -> tuple[Array, ...]:
            if b is None:
                bits = _bits(a, None)
            else:
                bits = _bits(ops.where(ops.less(ts[0], 0), b, a), b, keep)
            if not nearest:
                return tuple(ops.greater_equal(bits, t) for t in ts)
            return tuple(f for t in ts for f in _probe_figures(bits, t))

        if not nearest:  # counts only: each threshold is its own nearest
            zeros = (ops.zeros((), "int32"),) * len(ts)
            counts = _reduce_over_slices(figures, (a, b, keep), zeros, row)
            return tuple((c, t, t - 1) for c, t in zip(counts, ts, strict=True))
        inits = tuple(i for _ in ts for i in _probe_inits())
        out = _reduce_over_slices(figures, (a, b, keep), inits, row, _PROBE_KINDS * len(ts))
        return tuple(tuple(out[3 * j : 3 * j + 3]) for j in range(len(ts)))  # type: ignore[misc]

    one = ops.convert_to_tensor(1, "int32")  # a probe at 1 counts the scores above zero
    stride = approx_stride(n)  # a prime stride visits every column
    pair = _counts_in_pairs()
    if stride == 1:
        # short (no sample): the bits written once and counted only. A pass is a few
        # microseconds here, where finding the nearest scores made it 3-5x longer than
        # the rounds it saved (JAX, 10k entries: 100 us a search against 250)
        bits = _bits(a, b, keep)
        counts = _counter(bits)
        t, c_t, _, c_above = _narrow(counts, k, n, counts(one), ops.max(bits) + 1, pair)
    else:  # a sample shorter than the array brackets the cut
        sample = _bits(*(None if x is None else x[::stride] for x in (a, b, keep)))
        m = int(sample.shape[0])
        q = k / n
        margin = 3.0 * float(np.sqrt(q * (1 - q) / m)) + 1.0 / m
        rank_lo = min(m, int(np.ceil((q + margin) * m)))  # likely >= k entries at or above
        rank_hi = max(1, int(np.floor((q - margin) * m)))  # likely < k entries at or above
        top, counts = ops.max(sample) + 1, _counter(sample)
        # from the count above zero: where a unit rule's mask left the cut among the
        # zeros, the bracket's ends are 0 and 1 at once (bisecting the bits down to 1
        # took 54 rounds)
        lo, c_lo, hi, c_hi = _narrow(counts, rank_lo, m, counts(one), top, pair)
        # rank_hi <= rank_lo: the second search starts from where the first ended
        ends = ((c_lo, lo, lo - 1), (c_hi, hi, hi - 1))
        hi = _narrow(counts, rank_hi, m, ends, top, pair)[2]
        # the first pass probes 1 and the sample's bracket, counted only (finding the
        # bracket's nearest scores cost more than the rounds it saved)
        t, c_t, _, c_above = _narrow(probe, k, n, probe(one, lo, hi, nearest=False))

    # More than k at or above t (common in training, where a step's changes are
    # multiples of the weights' rounding): the c_above entries above t (its hi is
    # t + 1) and the first k - c_above of those equal to t.
    def with_ties() -> Array:
        return _above_and_first_ties(a, b, keep, t, k - c_above, row)

    return ops.cond(ops.equal(c_t, k), lambda: ops.greater_equal(_bits(a, b, keep), t), with_ties)


_PROBE_KINDS = (SUM, MIN, MAX)


def _probe_figures(bits: Array, t: Array) -> tuple[Array, Array, Array]:
    """Per entry, for a probe at ``t``: whether ``bits >= t``; the bits where so (else
    :data:`FLOAT_BITS_END`), for the least of them; the bits where not (else -1), for
    the greatest. Reduced as :data:`_PROBE_KINDS` from :func:`_probe_inits`."""
    at_or_above = ops.greater_equal(bits, t)
    none_above, none_below = _probe_inits()[1:]
    return (
        at_or_above,
        ops.where(at_or_above, bits, none_above),
        ops.where(at_or_above, none_below, bits),
    )


def _probe_inits() -> tuple[Array, Array, Array]:
    """The starting values of a probe's reductions: no entry counted, none at or above
    the threshold (:data:`FLOAT_BITS_END`), none below it (-1)."""
    int32 = "int32"
    return (
        ops.zeros((), int32),
        ops.convert_to_tensor(FLOAT_BITS_END, int32),
        ops.convert_to_tensor(-1, int32),
    )


def _above_and_first_ties(
    a: Array, b: Array | None, keep: Array | None, t: Array, room: Array, row: int
) -> Array:
    """``bits > t`` and the first ``room`` entries whose bits equal ``t`` (by index)."""
    last = _last_tie(a, b, keep, t, room, row)
    bits = _bits(a, b, keep)
    index = ops.arange(int(a.shape[0]), dtype="int32")
    ties = ops.logical_and(ops.equal(bits, t), ops.less_equal(index, last))
    return ops.logical_or(ops.greater(bits, t), ties)


def _last_tie(
    a: Array, b: Array | None, keep: Array | None, t: Array, room: Array, row: int = 0
) -> Array:
    """The index of the ``room``-th entry whose bits equal ``t`` (of the scores of
    :func:`_search_top`; there are at least ``room`` of them).

    One pass counts them per block of ``row`` entries (:func:`row_width`; else
    :data:`_RANK_BLOCK`), the last block the remainder; then only the block that holds
    the ``room``-th is ranked. Under XLA only (JAX, or TensorFlow inside
    :func:`xla_on_tensorflow`): the blocks are counted by a variadic reduction.
    """
    n = int(a.shape[0])
    width = min(row or _RANK_BLOCK, n)
    arrays = (a, b, keep)

    def ties(a: Array, b: Array | None, keep: Array | None) -> Array:
        return ops.cast(ops.equal(_bits(a, b, keep), t), "int32")

    rows, tail = _rows_and_tail(arrays, width)  # rows: width <= n
    bits = _bits(*rows)
    # the count above t beside it, unused: a lone count wrote its flags whole before
    # summing them (0.4 ms on the paper MLP's kernel); a pair is fused (0.16 ms)
    flags = [ops.cast(f(bits, t), "int32") for f in (ops.equal, ops.greater)]
    per_block = _reduce_rows(flags, [SUM, SUM])[0]
    if tail is not None:
        per_block = ops.concatenate([per_block, ops.sum(ties(*tail), keepdims=True)])
    through = ops.cumsum(per_block)  # the ties up to and including each block
    block = ops.cast(ops.argmax(ops.greater_equal(through, room)), "int32")
    before_block = ops.take(through - per_block, block)
    start = block * width
    # the block as a slice of `width` entries ending no later than n (the remainder's
    # slice reaches back into the block before it; those entries are left out)
    first = ops.minimum(start, n - width)
    in_block = ops.greater_equal(first + ops.arange(width, dtype="int32"), start)
    # gathered: TensorFlow's XLA took 1.7 ms for a slice at a computed start (0.1 here)
    at = first + ops.arange(width, dtype="int32")
    seg = [None if x is None else ops.take(x, at) for x in arrays]
    rank = ops.cumsum(ops.where(in_block, ties(*seg), 0)) + before_block
    # the room-th tie is the first entry whose rank reaches room
    return first + ops.cast(ops.argmax(ops.greater_equal(rank, room)), "int32")


def _counter(bits: Array) -> Callable[..., tuple[tuple[Array, Array, Array], ...]]:
    """The probes of :func:`_narrow` on a short ``bits``: the count at or above each
    threshold only (on a strided sample, finding the nearest bits cost more than the
    rounds they saved)."""

    def probe(*ts: Array) -> tuple[tuple[Array, Array, Array], ...]:
        return tuple((_count(ops.greater_equal(bits, t)), t, t - 1) for t in ts)

    return probe


def _counts_in_pairs() -> bool:
    """True where a round of :func:`_counter`'s counts probes two thresholds: JAX,
    where XLA counts both in one fused pass."""
    return keras.backend.backend() == "jax"


def _bits(a: Array, b: Array | None, keep: Array | None = None) -> Array:
    """The int32 bit patterns of the float32 scores ``a``, or of ``|a - b|`` (zero
    where ``keep`` is False)."""
    scores = a if b is None else ops.abs(a - b)
    if keep is not None:
        scores = ops.where(keep, scores, ops.zeros_like(scores))
    return ops.view(ops.cast(scores, "float32"), "int32")


def _approx_top(scores: Array, k: int) -> Array:
    """``scores >= t``, ``t`` the matching order statistic of a strided sample (as the core)."""
    n = int(scores.shape[0])
    bits = ops.view(ops.cast(scores, "float32"), "int32")
    sample = bits[:: approx_stride(n)]
    m = int(sample.shape[0])
    r = min(m - 1, max(0, m - round(k * m / n)))
    # the r-th smallest of the sample (NumPy's partition) is its (m - r)-th largest
    if _compiled_loops():
        top, counts = ops.max(sample) + 1, _counter(sample)
        # from the count above zero, as _search_top's searches: a cut among a unit
        # mask's zeros is then found at once
        one = ops.convert_to_tensor(1, "int32")
        lo = _narrow(counts, m - r, m, counts(one), top, _counts_in_pairs())[0]
        # lo has m - r entries at or above it, or is the value itself: the smallest of them
        t = ops.min(ops.where(ops.greater_equal(sample, lo), sample, FLOAT_BITS_END))
    else:
        t = ops.top_k(sample, m - r, sorted=True)[0][m - r - 1]
    return ops.where(ops.greater(t, 0), ops.greater_equal(bits, t), ops.greater(bits, 0))


def _compiled_loops() -> bool:
    """True where ``ops.while_loop`` runs in the compiled step (TF, JAX), not in Python.

    The torch backend loops in Python with a host sync per iteration, so there
    ``top_k`` (fast in torch) is the better selection.
    """
    return keras.backend.backend() in ("tensorflow", "jax")


def _count(flags: Array) -> Array:
    """The number of True entries, as an int32 scalar.

    Summed in float32 below 2**24 entries, where a sum of 0/1 is exact: XLA's CPU
    backend sums float32 about 4x faster than int32 (784k entries, JAX: 0.11 ms
    against 0.48 ms).
    """
    if int(np.prod(flags.shape)) < _EXACT_FLOAT_COUNT:
        return ops.cast(ops.sum(ops.cast(flags, "float32")), "int32")
    return ops.sum(ops.cast(flags, "int32"))


def _narrow(
    probe: Callable[..., tuple[tuple[Array, Array, Array], ...]],
    k: int,
    n: int,
    found: tuple[tuple[Array, Array, Array], ...] = (),
    top: Any = FLOAT_BITS_END,
    pair: bool = False,
) -> tuple[Array, Array, Array, Array]:
    """The bits ``lo`` of a score with exactly ``k`` of the ``n`` bits at or above it,
    or, where ties leave none, ``lo`` the k-th largest bits and ``hi = lo + 1``.
    Returns ``(lo, count(lo), hi, count(hi))``.

    ``probe(*ts)`` gives, in one pass, for each threshold ``t``: the number of bits
    ``>= t``, the least bits ``>= t`` and the greatest bits ``< t``
    (:func:`_probe_figures`), or ``t`` and ``t - 1`` for those where finding them
    costs more than a round (:func:`_counter`). The search starts from ``[0, top)``
    (``top``: above every bits), narrowed by the probes already ``found``.
    Each probe moves an end of ``[lo, hi)`` onto the scores next to it: ``lo`` to the
    least score at or above it, ``hi`` to just above the greatest below it, so that
    a cut among a few scores, or at a tied score, is found in a round or two.

    A round probes one threshold interpolated linearly on the counts between the
    ends' bits, and every fourth halves the bits (at most 31 halvings on any data).
    The bits of a float grow like its logarithm, so the interpolation follows scores
    spread over decades: interpolated on the scores' values, a search of the top tenth
    of 10k changes took 20 rounds, on their bits 8. With ``pair`` a round
    probes two, aimed either side of ``k``, so that neither end stalls (for counts
    only, where :func:`_counts_in_pairs`).
    """

    def take(state: tuple, probed: tuple[Array, Array, Array]) -> tuple:
        lo, hi, c_lo, c_hi = state
        c, least_above, greatest_below = probed
        enough = ops.greater_equal(c, k)
        raise_lo = ops.logical_and(enough, ops.greater(least_above, lo))
        lower_hi = ops.logical_and(ops.logical_not(enough), ops.less(greatest_below + 1, hi))
        return (
            ops.where(raise_lo, least_above, lo),
            ops.where(lower_hi, greatest_below + 1, hi),
            ops.where(raise_lo, c, c_lo),
            ops.where(lower_hi, c, c_hi),
        )

    def more(lo: Array, hi: Array, c_lo: Array, c_hi: Array, i: Array) -> Array:
        return ops.logical_and(ops.greater(hi - lo, 1), ops.not_equal(c_lo, k))

    def narrow(lo: Array, hi: Array, c_lo: Array, c_hi: Array, i: Array) -> tuple:
        width = ops.cast(hi - lo, "float32")
        span = ops.maximum(c_lo - c_hi, 1)
        mid = lo + (hi - lo) // 2

        def at(target: Any) -> Array:
            share = ops.clip(ops.cast(c_lo - target, "float32") / ops.cast(span, "float32"), 0, 1)
            return ops.clip(lo + ops.cast(width * share, "int32"), lo + 1, hi - 1)

        if pair:
            spread = span // 32  # aim the probes this many entries either side of k
            t1 = at(k + spread)
            t2 = ops.where(ops.equal(i % 2, 1), mid, at(k - spread - 1))
            t2 = ops.clip(t2 + ops.cast(ops.equal(t2, t1), "int32"), lo + 1, hi - 1)
            probes = (t1, t2)
        else:
            probes = (ops.where(ops.equal(i % 4, 3), mid, at(k)),)
        state = (lo, hi, c_lo, c_hi)
        for probed in probe(*probes):  # each probe in [lo + 1, hi - 1]
            state = take(state, probed)
        return (*state, i + 1)

    int32 = "int32"
    state = (
        ops.zeros((), int32),
        ops.convert_to_tensor(top, int32),
        ops.convert_to_tensor(n, int32),
        ops.zeros((), int32),
    )
    for probed in found:
        state = take(state, probed)
    lo, hi, c_lo, c_hi, _ = ops.while_loop(more, narrow, (*state, ops.zeros((), int32)))
    return lo, c_lo, hi, c_hi


def _keep_above(s: Array, t: Array, k: int) -> Array:
    """Entries ``> t`` plus the first entries ``== t`` (by index), ``k`` per row."""
    above = ops.greater(s, t)
    room = k - ops.sum(ops.cast(above, "int32"), axis=1, keepdims=True)
    return ops.logical_or(above, _first_true(ops.equal(s, t), room))


_RANK_BLOCK = 512


def _first_true(flags: Array, room: Array) -> Array:
    """The first ``room`` True entries (by index) of each row of a boolean ``(rows, n)``
    array; ``room`` is ``(rows, 1)`` int32.

    Two levels instead of a cumulative sum over the whole row (XLA's took 5 ms over
    784k entries on the CPU): count the Trues per block of :data:`_RANK_BLOCK`, find
    the block holding the ``room``-th, and rank only inside it.
    """
    rows, n = (int(d) for d in flags.shape)
    width = min(_RANK_BLOCK, n)
    n_blocks = -(-n // width)
    x = ops.cast(flags, "int32")
    if n_blocks * width != n:
        x = ops.pad(x, [(0, 0), (0, n_blocks * width - n)])
    blocks = ops.reshape(x, (rows, n_blocks, width))
    per_block = ops.sum(blocks, axis=2)
    through = ops.cumsum(per_block, axis=1)  # Trues up to and including each block
    reach = ops.greater_equal(through, room)
    # the block where the room-th True lies (the last block when there are fewer Trues)
    last = ops.where(ops.any(reach, axis=1), ops.argmax(reach, axis=1), n_blocks - 1)
    last = ops.expand_dims(ops.cast(last, "int32"), 1)
    prior = ops.take_along_axis(through - per_block, last, axis=1)  # Trues before it
    inside = ops.take_along_axis(blocks, ops.expand_dims(last, 2), axis=1)[:, 0, :]
    rank = ops.cumsum(inside, axis=1) + prior
    # ranks grow along the block, so the entries within room are a prefix of it
    limit = last * width + ops.sum(
        ops.cast(ops.less_equal(rank, room), "int32"), axis=1, keepdims=True
    )
    index = ops.expand_dims(ops.arange(n, dtype="int32"), 0)
    return ops.logical_and(flags, ops.less(index, limit))


keras_ops = KerasOps()
