"""Property tests of the framework-free core against brute-force definitions.

Every oracle here is written the slow, obvious way (Python ``sorted``, loops,
``math.fsum``) straight from the definitions in SCIENCE.md, and compared with
the NumPy reference implementation in :mod:`energy_callbacks.core`. Values are
drawn from a coarse grid (small integers times a power of two) so that ties in
``|dw|`` are frequent and every sum of them is exact in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from energy_callbacks.core import (
    EnergyMeter,
    FixedSubnetwork,
    Lazy,
    Margin,
    MemorizedMistakes,
    MistakeMemory,
    Plasticity,
    RandomUnits,
    TensorSpec,
    Threshold,
    TopFraction,
    Topology,
    TopUnits,
    numpy_ops,
)

SETTINGS = settings(max_examples=100, deadline=None)
FEW = settings(max_examples=50, deadline=None)

DTYPES = st.sampled_from([np.float16, np.float32, np.float64])
FRACTIONS = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
SHAPES = st.one_of(
    st.just((3,)),
    st.just((1,)),
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4),
)


# -- strategies ---------------------------------------------------------------


@st.composite
def scales(draw: st.DrawFn) -> float:
    """A power of two: grid values ``int * scale`` are exact in float16 and sum exactly."""
    return 2.0 ** draw(st.integers(-6, 1))


@st.composite
def grid_arrays(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    dtype: type,
    scale: float | None = None,
    low: int = -4,
    high: int = 4,
) -> np.ndarray:
    """An array of ``int * scale`` in ``dtype``: few distinct values, many ties."""
    ints = draw(hnp.arrays(np.int64, shape, elements=st.integers(low, high)))
    if scale is None:
        scale = draw(scales())
    return (ints * scale).astype(dtype)


@st.composite
def loose_topologies(draw: st.DrawFn) -> Topology:
    """1-3 tensors of random shapes without unit structure."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    return Topology([TensorSpec(f"t{i}", s, None) for i, s in enumerate(shapes)])


@st.composite
def mlps(
    draw: st.DrawFn, min_layers: int = 1, max_layers: int = 3, bias: bool | None = None
) -> Topology:
    sizes = draw(st.lists(st.integers(1, 5), min_size=min_layers + 1, max_size=max_layers + 1))
    if bias is None:
        bias = draw(st.booleans())
    layout = draw(st.sampled_from(["torch", "keras"]))
    return Topology.mlp(sizes, bias=bias, layout=layout)


@st.composite
def proposals(
    draw: st.DrawFn, topology: Topology, dtype: type, scale: float | None = None
) -> list[np.ndarray]:
    if scale is None:
        scale = draw(scales())
    return [draw(grid_arrays(t.shape, dtype, scale)) for t in topology.tensors]


# -- brute-force oracles ------------------------------------------------------


def bf_keep_count(p: float, n: int) -> int:
    return min(n, max(1, math.floor(p * n + 0.5)))


def bf_top_k(scores: Sequence[float], k: int, largest: bool = True) -> list[bool]:
    """The ``k`` best entries; ties to the lower index."""
    vals = [float(s) for s in scores]
    order = sorted(range(len(vals)), key=lambda i: (-vals[i] if largest else vals[i], i))
    keep = set(order[: max(0, k)])
    return [i in keep for i in range(len(vals))]


def bf_top_k_tensor(dw: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    flat = [abs(float(v)) for v in dw.ravel(order="C")]
    return np.array(bf_top_k(flat, k, largest), dtype=bool).reshape(dw.shape)


def bf_top_fraction(
    dws: Sequence[np.ndarray], p: float, largest: bool = True, equal_count: bool = False
) -> list[np.ndarray]:
    n_max = max(d.size for d in dws)
    out = []
    for d in dws:
        k = min(d.size, bf_keep_count(p, n_max)) if equal_count else bf_keep_count(p, d.size)
        out.append(bf_top_k_tensor(d, k, largest))
    return out


def bf_threshold(dws: Sequence[np.ndarray], theta: float) -> list[np.ndarray]:
    out = []
    for d in dws:
        flags = [abs(float(v)) >= theta for v in d.ravel()]
        out.append(np.array(flags, dtype=bool).reshape(d.shape))
    return out


def dense_layers(topology: Topology) -> list[tuple[int, int | None]]:
    """``(kernel index, bias index or None)`` per layer of a ``Topology.mlp``."""
    return [
        (layer.kernel, layer.followers[0] if layer.followers else None) for layer in topology.layers
    ]


def bf_per_unit(
    topology: Topology, dws: Sequence[np.ndarray], p: float, largest: bool = True
) -> list[np.ndarray]:
    out: list[np.ndarray] = [np.zeros(d.shape, dtype=bool) for d in dws]
    for ki, bi in dense_layers(topology):
        spec = topology.tensors[ki]
        axis = spec.unit_axis
        moved = np.moveaxis(dws[ki], axis, 0)
        kmask = np.zeros(moved.shape, dtype=bool)
        for u in range(moved.shape[0]):
            pool = [abs(float(v)) for v in moved[u].ravel()]
            if bi is not None:
                pool.append(abs(float(dws[bi][u])))
            keep = bf_top_k(pool, bf_keep_count(p, len(pool)), largest)
            width = moved[u].size
            kmask[u] = np.array(keep[:width], dtype=bool).reshape(moved[u].shape)
            if bi is not None:
                out[bi][u] = keep[width]
        out[ki] = np.moveaxis(kmask, 0, axis)
    return out


def bf_unit_scores(topology: Topology, dws: Sequence[np.ndarray], ki: int, bi: int | None) -> list:
    spec = topology.tensors[ki]
    moved = np.moveaxis(dws[ki], spec.unit_axis, 0)
    scores = []
    for u in range(moved.shape[0]):
        s = math.fsum(abs(float(v)) for v in moved[u].ravel())
        if bi is not None:
            s += abs(float(dws[bi][u]))
        scores.append(s)
    return scores


def bf_unit_masks(
    topology: Topology, selected: dict[str, list[bool]], path: bool
) -> list[np.ndarray]:
    """Tensor masks from unit selections: post side, and pre side when ``path``."""
    out: list[np.ndarray] = [np.ones(t.shape, dtype=bool) for t in topology.tensors]
    prev_sel: list[bool] | None = None
    for layer, (ki, bi) in zip(topology.layers, dense_layers(topology), strict=True):
        spec = topology.tensors[ki]
        post = selected.get(layer.name, [True] * layer.n_units)
        pre = prev_sel if (path and prev_sel is not None) else [True] * layer.n_inputs
        kmask = np.zeros(spec.shape, dtype=bool)
        for i in range(layer.n_units):
            for j in range(layer.n_inputs):
                idx = (i, j) if spec.unit_axis == 0 else (j, i)
                kmask[idx] = post[i] and pre[j]
        out[ki] = kmask
        if bi is not None:
            out[bi] = np.array(post, dtype=bool)
        prev_sel = post
    return out


def as_mask(m: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape, dtype=bool) if m is None else np.asarray(m, dtype=bool)


def assert_masks_equal(got: Sequence, want: Sequence[np.ndarray], shapes: Sequence) -> None:
    assert len(got) == len(want)
    for g, w, s in zip(got, want, shapes, strict=True):
        g = as_mask(g, s)
        assert g.shape == tuple(s)
        np.testing.assert_array_equal(g, w)


# -- 1. top_k_mask -------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(),
    rows=st.integers(1, 5),
    cols=st.integers(1, 8),
    dtype=DTYPES,
    largest=st.booleans(),
    per_row=st.booleans(),
)
def test_top_k_mask_matches_brute_force(data, rows, cols, dtype, largest, per_row):
    scores = data.draw(grid_arrays((rows, cols), dtype, low=-3, high=3))
    if per_row:
        k = np.array(data.draw(st.lists(st.integers(0, cols + 2), min_size=rows, max_size=rows)))
        ks = [int(x) for x in k]
    else:
        k = data.draw(st.integers(0, cols + 2))
        ks = [k] * rows
    mask = numpy_ops.top_k_mask(scores, k, largest)
    assert mask.shape == (rows, cols) and mask.dtype == bool
    for r in range(rows):
        assert int(mask[r].sum()) == min(ks[r], cols)
        assert mask[r].tolist() == bf_top_k(scores[r].tolist(), ks[r], largest)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1 << 15, (1 << 15) + 3000),
    spread=st.sampled_from([1, 3, 50, 10**6]),
    k_frac=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])),
    k_shift=st.integers(-2, 2),
    largest=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    dtype=DTYPES,
)
def test_top_k_mask_long_rows(n, spread, k_frac, k_shift, largest, seed, dtype):
    """Long single rows (the sampled-bracket path) against a lexsort brute force."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, spread + 1, size=n) * (8.0 / spread)).astype(dtype)
    k = min(n, max(0, int(k_frac * n) + k_shift))
    key = scores.astype(np.float64)
    order = np.lexsort((np.arange(n), -key if largest else key))  # last key sorts first
    want = np.zeros(n, dtype=bool)
    want[order[:k]] = True
    mask = numpy_ops.top_k_mask(scores[None, :], k, largest)
    assert mask.shape == (1, n) and int(mask.sum()) == k
    np.testing.assert_array_equal(mask[0], want)


# -- 2. TopFraction ------------------------------------------------------------


@SETTINGS
@given(data=st.data(), topo=loose_topologies(), dtype=DTYPES, p=FRACTIONS, largest=st.booleans())
def test_top_fraction_whole_tensor(data, topo, dtype, p, largest):
    dws = data.draw(proposals(topo, dtype))
    masks = TopFraction(p, largest=largest).masks(dws, topo)
    for m, d in zip(masks, dws, strict=True):
        assert m is not None and m.shape == d.shape
        assert int(np.count_nonzero(m)) == bf_keep_count(p, d.size)
    assert_masks_equal(masks, bf_top_fraction(dws, p, largest), [d.shape for d in dws])


@SETTINGS
@given(data=st.data(), topo=loose_topologies(), dtype=DTYPES)
def test_top_fraction_one_keeps_everything(data, topo, dtype):
    dws = data.draw(proposals(topo, dtype))
    for m, d in zip(TopFraction(1.0).masks(dws, topo), dws, strict=True):
        assert as_mask(m, d.shape).all()
    plastic = Plasticity(synapses=1.0).setup(topo)
    for a, d in zip(plastic.step(dws).applied, dws, strict=True):
        np.testing.assert_array_equal(a, d)


@SETTINGS
@given(data=st.data(), topo=loose_topologies(), dtype=DTYPES, p=FRACTIONS)
def test_top_fraction_equal_count(data, topo, dtype, p):
    dws = data.draw(proposals(topo, dtype))
    k_ref = bf_keep_count(p, max(t.size for t in topo.tensors))
    masks = TopFraction(p, equal_count=True).masks(dws, topo)
    for m, d in zip(masks, dws, strict=True):
        assert int(np.count_nonzero(m)) == min(d.size, k_ref)
    assert_masks_equal(masks, bf_top_fraction(dws, p, equal_count=True), [d.shape for d in dws])


@SETTINGS
@given(data=st.data(), topo=mlps(), dtype=DTYPES, p=FRACTIONS, largest=st.booleans())
def test_top_fraction_per_unit(data, topo, dtype, p, largest):
    dws = data.draw(proposals(topo, dtype))
    masks = TopFraction(p, per_unit=True, largest=largest).masks(dws, topo)
    for layer, (ki, bi) in zip(topo.layers, dense_layers(topo), strict=True):
        pool = layer.n_inputs + (1 if bi is not None else 0)
        kept = np.moveaxis(masks[ki], topo.tensors[ki].unit_axis, 0).sum(axis=1)
        if bi is not None:
            kept = kept + masks[bi]
        assert kept.tolist() == [bf_keep_count(p, pool)] * layer.n_units
    assert_masks_equal(masks, bf_per_unit(topo, dws, p, largest), [d.shape for d in dws])


# -- 3. Threshold --------------------------------------------------------------


@st.composite
def thresholds_for(draw: st.DrawFn, dws: Sequence[np.ndarray], dtype: type) -> float:
    """Theta on, next to, just off (not representable in ``dtype``) or far from a |dw|."""
    values = sorted({abs(float(v)) for d in dws for v in d.ravel()})
    kind = draw(st.sampled_from(["exact", "neighbour", "nudged", "anywhere"]))
    theta = draw(st.sampled_from(values))
    if kind == "neighbour":
        direction = draw(st.sampled_from([np.inf, -np.inf]))
        theta = float(np.nextafter(dtype(theta), dtype(direction)))
    elif kind == "nudged":
        theta = theta * (1 + draw(st.sampled_from([1e-9, -1e-9]))) + draw(
            st.sampled_from([0.0, 1e-12])
        )
    elif kind == "anywhere":
        theta = draw(st.floats(0.0, 20.0))
    return max(theta, 0.0)


@SETTINGS
@given(data=st.data(), topo=loose_topologies(), dtype=DTYPES)
def test_threshold_matches_definition(data, topo, dtype):
    dws = data.draw(proposals(topo, dtype))
    theta = data.draw(thresholds_for(dws, dtype))
    masks = Threshold(theta).masks(dws, topo)
    assert_masks_equal(masks, bf_threshold(dws, theta), [d.shape for d in dws])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_threshold_is_not_rounded_to_the_dtype(dtype):
    """Regression: theta just above |dw| used to round down to it in the dtype."""
    dw = np.array([0.1, -0.1], dtype=dtype)
    theta = float(dw[0]) * (1 + 1e-9)
    assert abs(float(dw[0])) < theta
    topo = Topology([TensorSpec("t", (2,), None)])
    assert not Threshold(theta).masks([dw], topo)[0].any()
    assert Threshold(float(dw[0])).masks([dw], topo)[0].all()


def _silent_threshold_mask(dtype: type, theta: float) -> np.ndarray:
    dw = np.array([65504.0, 1.0, 0.0], dtype=dtype)
    topo = Topology([TensorSpec("t", (3,), None)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Threshold(theta).masks([dw], topo)[0]


@pytest.mark.parametrize("theta", [1e6, 1e300])
def test_threshold_far_beyond_the_dtype_range_is_silent(theta):
    assert not _silent_threshold_mask(np.float16, theta).any()


def test_threshold_just_beyond_the_dtype_max_is_silent():
    assert not _silent_threshold_mask(np.float16, 65519.0).any()


def test_memory_ignores_stray_padding_bits():
    memory = MistakeMemory()
    memory.load_state_dict({"bits": np.array([0xFF], dtype=np.uint8), "size": 3})
    assert memory.count() == 3
    memory.set([7])
    np.testing.assert_array_equal(memory.flagged(), [0, 1, 2, 7])


# -- 4. composition ------------------------------------------------------------


@SETTINGS
@given(data=st.data(), topo=loose_topologies(), dtype=DTYPES, p=FRACTIONS, scale=scales())
def test_threshold_then_top_fraction_is_an_and(data, topo, dtype, p, scale):
    dws = data.draw(proposals(topo, dtype, scale))
    theta = data.draw(st.integers(0, 5)) * scale  # on the grid: exact in every dtype
    plastic = Plasticity(synapses=[Threshold(theta), TopFraction(p)]).setup(topo)
    got = plastic.masks(dws)
    first = bf_threshold(dws, theta)
    zeroed = [np.where(m, d, 0).astype(d.dtype) for m, d in zip(first, dws, strict=True)]
    second = bf_top_fraction(zeroed, p)
    want = [a & b for a, b in zip(first, second, strict=True)]
    assert_masks_equal(got, want, [d.shape for d in dws])
    step = plastic.step(dws)
    for a, d, w in zip(step.applied, dws, want, strict=True):
        np.testing.assert_array_equal(a, np.where(w, d, 0))


@st.composite
def synapse_rule_chains(draw: st.DrawFn, scale: float) -> list:
    """1-3 synapse rules; smallest-first TopFraction makes the zeroing observable."""
    chain = []
    for _ in range(draw(st.sampled_from([1, 2, 2, 3, 3]))):
        if draw(st.booleans()):
            chain.append(Threshold(draw(st.integers(0, 5)) * scale))
        else:
            p = draw(FRACTIONS)
            chain.append(
                TopFraction(p, largest=draw(st.booleans()), equal_count=draw(st.booleans()))
            )
    return chain


def bf_synapse_rule(rule, dws: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(rule, Threshold):
        return bf_threshold(dws, rule.theta)
    return bf_top_fraction(dws, rule.p, rule.largest, rule.equal_count)


@SETTINGS
@given(data=st.data(), topo=loose_topologies(), dtype=DTYPES, scale=scales())
def test_any_synapse_rule_chain_is_an_and(data, topo, dtype, scale):
    dws = data.draw(proposals(topo, dtype, scale))
    chain = data.draw(synapse_rule_chains(scale))
    combined = [np.ones(d.shape, dtype=bool) for d in dws]
    current = list(dws)
    for rule in chain:
        mask = bf_synapse_rule(rule, current)
        combined = [c & m for c, m in zip(combined, mask, strict=True)]
        current = [np.where(c, d, 0).astype(d.dtype) for c, d in zip(combined, dws, strict=True)]
    plastic = Plasticity(synapses=chain).setup(topo)
    assert_masks_equal(plastic.masks(dws), combined, [d.shape for d in dws])


@pytest.mark.parametrize(
    ("dw", "chain", "want"),
    [
        ([1.0, 2.0, 3.0, 4.0], [TopFraction(0.5, largest=False), TopFraction(0.5)], [1, 1, 0, 0]),
        ([1.0, 1.0, 1.0], [TopFraction(0.5, largest=False)] * 2, [1, 0, 0]),
        ([4.0, 3.0, 2.0, 1.0], [TopFraction(0.75, largest=False), TopFraction(0.25)], [0, 1, 0, 0]),
    ],
)
def test_later_rules_rank_only_the_survivors(dw, chain, want):
    """Regression examples where ranking unzeroed proposals would give another answer."""
    topo = Topology([TensorSpec("t", (len(dw),), None)])
    dws = [np.array(dw)]
    combined, current = [np.ones(len(dw), dtype=bool)], dws
    for rule in chain:
        combined = [combined[0] & bf_synapse_rule(rule, current)[0]]
        current = [np.where(combined[0], dws[0], 0.0)]
    assert combined[0].astype(int).tolist() == want
    mask = Plasticity(synapses=chain).setup(topo).masks(dws)[0]
    assert mask.astype(int).tolist() == want


@SETTINGS
@given(
    data=st.data(),
    topo=mlps(bias=True),
    dtype=DTYPES,
    q=FRACTIONS,
    p=FRACTIONS,
    path=st.booleans(),
)
def test_units_then_synapses_is_an_and(data, topo, dtype, q, p, path):
    dws = data.draw(proposals(topo, dtype))
    plastic = Plasticity(synapses=TopFraction(p), units=TopUnits(q, path=path)).setup(topo)
    got = plastic.masks(dws)
    selected = bf_top_units(topo, dws, q, None, True)
    first = bf_unit_masks(topo, selected, path)
    zeroed = [np.where(m, d, 0).astype(d.dtype) for m, d in zip(first, dws, strict=True)]
    second = bf_top_fraction(zeroed, p)
    want = [a & b for a, b in zip(first, second, strict=True)]
    assert_masks_equal(got, want, [d.shape for d in dws])


@SETTINGS
@given(data=st.data(), topo=st.one_of(loose_topologies(), mlps()), dtype=DTYPES)
def test_no_rules_keeps_everything(data, topo, dtype):
    dws = data.draw(proposals(topo, dtype))
    plastic = Plasticity().setup(topo)
    assert not plastic.restricts
    assert plastic.masks(dws) == [None] * len(dws)
    step = plastic.step(dws)
    assert not step.skipped and step.masks == [None] * len(dws)
    for a, d in zip(step.applied, dws, strict=True):
        assert a.dtype == d.dtype
        np.testing.assert_array_equal(a, d)


# -- 5. energy -----------------------------------------------------------------


def bf_energy(tensors: Sequence[TensorSpec], steps: Sequence[Sequence], alpha: float) -> dict:
    """Totals over applied updates (None = no change), in float64, the obvious way."""
    per: dict[str, dict] = {}
    for i, t in enumerate(tensors):
        vals = [abs(float(v)) for step in steps if step[i] is not None for v in step[i].ravel()]
        disp = np.zeros(t.shape, dtype=np.float64)
        for step in steps:
            if step[i] is not None:
                disp = disp + step[i].astype(np.float64)
        per[t.name] = {
            "synapses": t.size,
            "m1": math.fsum(vals),
            "m_alpha": math.fsum(v**alpha for v in vals),
            "m0": sum(v != 0 for v in vals),
            "m1_min": math.fsum(abs(float(v)) for v in disp.ravel()),
            "m0_min": sum(float(v) != 0 for v in disp.ravel()),
        }
    total = {
        key: (math.fsum if key in ("m1", "m_alpha", "m1_min") else sum)(
            layer[key] for layer in per.values()
        )
        for key in ("m1", "m_alpha", "m0", "m1_min", "m0_min")
    }
    return {"total": total, "per_layer": per}


def check_report(report, want: dict, n_steps: int) -> None:
    tot = want["total"]
    assert report.steps == n_steps
    assert report.m0 == tot["m0"] and report.m0_min == tot["m0_min"]
    for key in ("m1", "m_alpha", "m1_min"):
        assert np.isclose(getattr(report, key), tot[key], rtol=1e-12, atol=0), key
    if report.m1_min > 0:
        assert report.inefficiency >= 1 - 1e-12
    assert list(report.per_layer) == list(want["per_layer"])
    for name, layer in report.per_layer.items():
        w = want["per_layer"][name]
        assert layer.name == name and layer.synapses == w["synapses"]
        assert layer.m0 == w["m0"] and layer.m0_min == w["m0_min"]
        for key in ("m1", "m_alpha", "m1_min"):
            assert np.isclose(getattr(layer, key), w[key], rtol=1e-12, atol=0), (name, key)
        if layer.m1_min > 0:
            assert layer.inefficiency >= 1 - 1e-12


def same_report(a, b) -> None:
    """Field-by-field equality, NaN equal to NaN."""
    for key in (
        "m1",
        "m0",
        "m1_min",
        "m0_min",
        "inefficiency",
        "steps",
        "samples_seen",
        "samples_learned",
        "alpha",
        "m_alpha",
        "skipped_steps",
        "joules",
    ):
        x, y = getattr(a, key), getattr(b, key)
        assert x == y or (x != x and y != y), key
    assert list(a.per_layer) == list(b.per_layer)
    for name in a.per_layer:
        la, lb = a.per_layer[name], b.per_layer[name]
        for key in ("synapses", "m1", "m0", "m_alpha", "m1_min", "m0_min"):
            assert getattr(la, key) == getattr(lb, key), (name, key)


RULES = st.sampled_from(["none", "top", "threshold", "units", "both"])


def make_plasticity(kind: str, alpha: float, p: float, scale: float) -> Plasticity:
    synapses = {"top": TopFraction(p), "threshold": Threshold(2 * scale)}.get(kind)
    if kind == "both":
        return Plasticity(synapses=TopFraction(p), units=TopUnits(p), alpha=alpha)
    if kind == "units":
        return Plasticity(units=TopUnits(p, path=True), alpha=alpha)
    return Plasticity(synapses=synapses, alpha=alpha)


@st.composite
def step_sequences(
    draw: st.DrawFn, topo: Topology, dtype: type, scale: float, max_steps: int = 5
) -> list[list[np.ndarray | None]]:
    n = draw(st.integers(1, max_steps))
    seq = []
    for _ in range(n):
        step = draw(proposals(topo, dtype, scale))
        drop = draw(
            st.lists(st.sampled_from([False, False, True]), min_size=len(step), max_size=len(step))
        )
        seq.append([None if d else a for a, d in zip(step, drop, strict=True)])
    return seq


@FEW
@given(
    data=st.data(),
    topo=st.one_of(loose_topologies(), mlps(bias=True)),
    dtype=DTYPES,
    alpha=st.floats(0.2, 3.0),
    p=FRACTIONS,
    scale=scales(),
    kind=RULES,
)
def test_energy_of_plasticity_steps(data, topo, dtype, alpha, p, scale, kind):
    plastic = make_plasticity(kind, alpha, p, scale).setup(topo)
    seq = data.draw(step_sequences(topo, dtype, scale))
    applied = []
    for proposed in seq:
        step = plastic.step(proposed)
        assert not step.skipped
        for a, d in zip(step.applied, proposed, strict=True):
            assert (a is None) == (d is None)
        applied.append(step.applied)
    report = plastic.report()
    check_report(report, bf_energy(topo.tensors, applied, alpha), len(seq))
    assert report.alpha == alpha and report.skipped_steps == 0

    # Checkpoint round trip, then one more step on both: identical reports.
    state = plastic.state_dict()
    twin = make_plasticity(kind, alpha, p, scale).setup(topo)
    twin.load_state_dict(state)
    same_report(twin.report(), report)
    more = data.draw(proposals(topo, dtype, scale))
    plastic.step(more)
    twin.step(more)
    same_report(twin.report(), plastic.report())

    # A step holding NaN/Inf is skipped and changes no total.
    before = plastic.report()
    bad = [d.copy() for d in more]
    which = data.draw(st.integers(0, len(bad) - 1))
    pos = data.draw(st.integers(0, bad[which].size - 1))
    bad[which].reshape(-1)[pos] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with pytest.warns(RuntimeWarning):
        step = plastic.step(bad)
    assert step.skipped
    for a, d in zip(step.applied, bad, strict=True):
        assert a.shape == d.shape and not np.any(a)
    after = plastic.report()
    assert after.skipped_steps == before.skipped_steps + 1
    assert after.steps == before.steps
    for key in ("m1", "m0", "m1_min", "m0_min", "m_alpha"):
        assert getattr(after, key) == getattr(before, key), key


@FEW
@given(
    data=st.data(),
    topo=st.one_of(loose_topologies(), mlps()),
    dtype=DTYPES,
    alpha=st.floats(0.2, 3.0),
    scale=scales(),
)
def test_energy_meter_record(data, topo, dtype, alpha, scale):
    meter = EnergyMeter(topo.tensors, alpha)
    seq = data.draw(step_sequences(topo, dtype, scale, max_steps=6))
    for updates in seq:
        assert meter.record(updates) is True
    report = meter.report()
    check_report(report, bf_energy(topo.tensors, seq, alpha), len(seq))

    twin = EnergyMeter(topo.tensors, alpha)
    twin.load_state_dict(meter.state_dict())
    same_report(twin.report(), report)

    bad = [np.full(t.shape, np.nan, dtype=dtype) for t in topo.tensors]
    with pytest.warns(RuntimeWarning):
        assert meter.record(bad) is False
    after = meter.report()
    assert after.skipped_steps == 1 and after.steps == report.steps
    assert after.m1 == report.m1 and after.m0 == report.m0
    assert after.m1_min == report.m1_min and after.m_alpha == report.m_alpha


@SETTINGS
@given(
    steps=st.lists(
        hnp.arrays(
            np.float64,
            (3,),
            elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_inefficiency_at_least_one_on_arbitrary_floats(steps):
    meter = EnergyMeter([TensorSpec("w", (3,), None)])
    for u in steps:
        meter.record([u])
    report = meter.report()
    assert report.m1 >= 0 and report.m1_min >= 0
    if report.m1_min > 0:
        assert report.inefficiency >= 1 - 1e-12


# -- 6. unit selection and the path rule ---------------------------------------


def bf_top_units(
    topo: Topology, dws: Sequence[np.ndarray], q: float | None, k: int | None, largest: bool
) -> dict[str, list[bool]]:
    hidden = {layer.name for layer in topo.hidden}
    out = {}
    for layer, (ki, bi) in zip(topo.layers, dense_layers(topo), strict=True):
        if layer.name not in hidden:
            continue
        count = bf_keep_count(q, layer.n_units) if q is not None else min(k, layer.n_units)
        out[layer.name] = bf_top_k(bf_unit_scores(topo, dws, ki, bi), count, largest)
    return out


@st.composite
def unit_rules(draw: st.DrawFn):
    kind = draw(st.sampled_from(["top", "random", "fixed"]))
    path = draw(st.booleans())
    q = draw(st.one_of(st.none(), FRACTIONS))
    k = None if q is not None else draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    if kind == "top":
        return TopUnits(q, k=k, path=path, largest=draw(st.booleans()))
    if kind == "random":
        return RandomUnits(q, k=k, seed=seed, path=path)
    return FixedSubnetwork(draw(st.integers(1, 6)), seed=seed)


@SETTINGS
@given(
    data=st.data(),
    topo=mlps(min_layers=3, max_layers=4, bias=True),
    dtype=DTYPES,
    rule=unit_rules(),
    step_no=st.integers(0, 3),
)
def test_unit_rules_and_path_masks(data, topo, dtype, rule, step_no):
    dws = data.draw(proposals(topo, dtype))
    full = [lyr.name for lyr in topo.hidden if rule.k is not None and rule.k >= lyr.n_units]
    if full:  # k would keep every unit of a hidden layer: refused, naming the layer
        with pytest.raises(ValueError, match=f"keeps every unit of the hidden layer.*{full[0]}"):
            Plasticity(units=rule).setup(topo)
        return
    plastic = Plasticity(units=rule).setup(topo)
    plastic.step_count = step_no
    masks = plastic.masks(dws)
    shapes = [t.shape for t in topo.tensors]
    layers = dense_layers(topo)
    output = topo.layers[-1]

    # Recover each layer's selection from its bias mask.
    selected = {}
    for layer, (_, bi) in zip(topo.layers, layers, strict=True):
        sel = as_mask(masks[bi], shapes[bi])
        if layer is output:
            assert sel.all()
            continue
        if rule.q is not None:
            count = bf_keep_count(rule.q, layer.n_units)
        else:
            count = rule.k
        assert int(sel.sum()) == count
        selected[layer.name] = sel.tolist()

    want = bf_unit_masks(topo, selected, rule.path)
    assert_masks_equal(masks, want, shapes)

    if isinstance(rule, TopUnits):
        assert selected == bf_top_units(topo, dws, rule.q, rule.k, rule.largest)
    else:  # the selection ignores the proposals and is reproducible
        other = data.draw(proposals(topo, dtype))
        assert_masks_equal(plastic.masks(other), want, shapes)
    if isinstance(rule, FixedSubnetwork):
        plastic.step_count = step_no + 7
        assert_masks_equal(plastic.masks(dws), want, shapes)


# -- 7. mistake memory ---------------------------------------------------------

ID_BATCHES = st.lists(st.lists(st.integers(0, 5000), max_size=60), max_size=8)


def memory_of(batches: Sequence[Sequence[int]]) -> MistakeMemory:
    mem = MistakeMemory()
    for b in batches:
        mem.set(np.array(b, dtype=np.int64))
    return mem


def check_memory(mem: MistakeMemory, ref: set[int], size: int) -> None:
    assert mem.size == len(mem) == size
    probe = np.arange(size + 20)
    np.testing.assert_array_equal(mem.get(probe), [i in ref for i in probe.tolist()])
    assert mem.count() == len(ref)
    assert mem.flagged().tolist() == sorted(ref)
    state = mem.state_dict()
    assert state["size"] == size and len(state["bits"]) == math.ceil(size / 8)


@SETTINGS
@given(batches=ID_BATCHES, other_batches=ID_BATCHES)
def test_mistake_memory_is_a_set(batches, other_batches):
    mem, ref, size = MistakeMemory(), set(), 0
    for b in batches:
        mem.set(np.array(b, dtype=np.int64))
        ref.update(b)
        size = max([size, *(i + 1 for i in b)])
        assert mem.size == size
    check_memory(mem, ref, size)

    copy = MistakeMemory()
    copy.load_state_dict(mem.state_dict())
    check_memory(copy, ref, size)
    a, b = mem.state_dict(), copy.state_dict()
    assert a["size"] == b["size"] and a["bits"].tobytes() == b["bits"].tobytes()

    other = memory_of(other_batches)
    other_ref = {i for b in other_batches for i in b}
    union_size = max(size, other.size)
    merged = memory_of(batches)
    merged.merge(other)
    check_memory(merged, ref | other_ref, union_size)
    via_state = memory_of(other_batches)
    via_state.merge(mem.state_dict())
    check_memory(via_state, ref | other_ref, union_size)
    check_memory(mem, ref, size)  # merging into another memory left this one alone


@st.composite
def batches_of_outputs(draw: st.DrawFn, n_ids: int, n_classes: int) -> list[tuple]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 8))
        outputs = draw(hnp.arrays(np.float64, (n, n_classes), elements=st.integers(-2, 2)))
        labels = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, n_classes - 1)))
        ids = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, n_ids - 1)))
        out.append((outputs, labels, ids))
    return out


def bf_argmax(row: Sequence[float]) -> int:
    return min(range(len(row)), key=lambda j: (-float(row[j]), j))


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[labels]


@FEW
@given(data=st.data(), n_ids=st.integers(1, 40), n_classes=st.integers(2, 4), hot=st.booleans())
def test_memorized_mistakes_gate(data, n_ids, n_classes, hot):
    topo = Topology.mlp([2, 2])
    plastic = Plasticity(samples=MemorizedMistakes()).setup(topo)
    flagged: set[int] = set()
    seen = learned = 0
    for outputs, labels, ids in data.draw(batches_of_outputs(n_ids, n_classes)):
        targets = one_hot(labels, n_classes) if hot else labels
        result = plastic.gate(outputs, targets, ids)
        wrong = [bf_argmax(o) != int(lab) for o, lab in zip(outputs, labels, strict=True)]
        want = [w or int(i) in flagged for w, i in zip(wrong, ids, strict=True)]
        flagged.update(int(i) for i, w in zip(ids, wrong, strict=True) if w)
        assert np.asarray(result.mask).tolist() == want
        assert result.seen == len(ids) and result.learned == sum(want)
        assert result.any == any(want)
        seen, learned = seen + len(ids), learned + sum(want)
    memory = plastic.samples.memory
    assert memory.flagged().tolist() == sorted(flagged)
    assert (plastic.samples_seen, plastic.samples_learned) == (seen, learned)

    twin = Plasticity(samples=MemorizedMistakes()).setup(topo)
    twin.load_state_dict(plastic.state_dict())
    assert twin.samples.memory.flagged().tolist() == sorted(flagged)
    assert twin.samples.memory.size == memory.size
    assert (twin.samples_seen, twin.samples_learned) == (seen, learned)
    for outputs, labels, ids in data.draw(batches_of_outputs(n_ids, n_classes)):
        a = plastic.gate(outputs, labels, ids).mask
        b = twin.gate(outputs, labels, ids).mask
        np.testing.assert_array_equal(a, b)


# -- 8. Lazy and Margin --------------------------------------------------------


def bf_softmax(row: Sequence[float]) -> list[float]:
    top = max(float(v) for v in row)
    ex = [math.exp(float(v) - top) for v in row]
    total = math.fsum(ex)
    return [e / total for e in ex]


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(1, 10),
    n_classes=st.integers(1, 5),
    hot=st.booleans(),
    from_logits=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_lazy_and_margin_gates(data, n, n_classes, hot, from_logits, dtype):
    outputs = data.draw(hnp.arrays(dtype, (n, n_classes), elements=st.integers(-3, 3)))
    if not from_logits:
        outputs = (outputs + 3) / 6  # "probabilities" in [0, 1], many ties
    labels = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, n_classes - 1)))
    targets = one_hot(labels, n_classes) if hot else labels

    wrong = [bf_argmax(o) != int(lab) for o, lab in zip(outputs, labels, strict=True)]
    assert np.asarray(Lazy().gate(outputs, targets)).tolist() == wrong

    probs = [bf_softmax(o) if from_logits else [float(v) for v in o] for o in outputs]
    p_true = [p[int(lab)] for p, lab in zip(probs, labels, strict=True)]
    on_boundary = st.sampled_from(p_true).filter(lambda x: x > 0)  # exactly a true-class p
    threshold = data.draw(st.one_of(st.floats(0.0, 1.0, exclude_min=True), on_boundary))
    if from_logits:  # the softmax is computed differently: stay off the boundary
        assume(all(abs(p - threshold) > 1e-9 for p in p_true))
    want = [w or p < threshold for w, p in zip(wrong, p_true, strict=True)]
    got = Margin(threshold, from_logits=from_logits).gate(outputs, targets)
    assert np.asarray(got).tolist() == want

    plastic = Plasticity(samples=Margin(threshold, from_logits=from_logits))
    plastic.setup(Topology.mlp([1, 1]))
    if n_classes == 1:  # one score per sample: argmax is always 0, the gate would decide nothing
        with pytest.raises(ValueError, match="1 class score"):
            plastic.gate(outputs, targets)
        return
    result = plastic.gate(outputs, targets)
    assert np.asarray(result.mask).tolist() == want and result.learned == sum(want)
