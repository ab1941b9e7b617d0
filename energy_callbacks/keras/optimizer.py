"""``PlasticityOptimizer``: any Keras optimizer, with the plasticity rules applied in-graph.

It wraps the user's optimizer the way ``keras.optimizers.LossScaleOptimizer``
does. Each step it lets the inner optimizer propose its update, masks the
proposal with the rules (see :class:`~energy_callbacks.keras.ops.KerasOps`),
applies ``mask * proposal`` and adds the real weight change to energy
accumulators. The accumulators are optimizer variables, so they run inside the
compiled step on every backend, and they are saved with the optimizer
(``model.save``, ``ModelCheckpoint``, ``BackupAndRestore``).

Skipped steps change nothing at all, optimizer state included:

- a step whose gradients hold NaN/Inf (counted in ``report().skipped_steps``;
  a proposal that turns NaN/Inf from finite gradients is undone in the weights
  and counted the same way, while the inner optimizer's state keeps its update);
  a step the inner ``LossScaleOptimizer`` skips (``mixed_float16``: inf/NaN
  gradients at this loss scale) changes nothing by itself and is counted there
  too, while the loss scaler keeps its new, lower scale;
- with a sample gate, a step where no sample passed. The gate zeroes the whole
  loss then, so the adapter reads "no sample" off an all-zero gradient.

Exactness of the totals: per step, sums are float32 (JAX runs without x64). They
are added to a float32 pair (value, rounding error) with an error-free sum, and
counts to two int32 words, so ``M1`` stays within float32 rounding of one step
(1e6 steps: 1e-12 relative error, tests/reliability) and ``M0`` is exact after
any number of steps. :meth:`energy_state` hands them to
the core in float64/int64.

Optimizer moments see every proposal (they are the inner optimizer's business);
only the weights are masked, as in the Lightning adapter. With synaptic caching
the applied change then enters a transient store kept in optimizer variables,
and the store's decay is part of the weights' new values
(:mod:`energy_callbacks.keras.caching`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ..core import Plasticity, Topology, checks
from ..core.config import from_config, to_config
from ..core.energy import net_change
from ..core.ops import numpy_ops
from ..core.units import RandomUnits
from .caching import CachingVariables
from .distribute import (
    any_across_replicas,
    assign_all,
    can_branch,
    restore_unless,
    run_if,
    tracing_on_tensorflow,
)
from .gate import GateState
from .host_step import HostStep, host_step_for
from .layers import describe, owner_kinds, wiring
from .ops import Difference, all_finite, change_totals, compiled_step, keras_ops
from .totals import (  # noqa: F401
    COUNT_BITS,
    carry_count,
    read_readout,
    readout,
    two_sum,
    two_sum_update,
)


def check_in_graph(plasticity: Plasticity) -> None:
    """Refuse the rules a compiled Keras train step cannot run."""
    if isinstance(plasticity.units, RandomUnits):
        raise ValueError(
            "units=RandomUnits redraws its units on the host at every step, which a "
            "compiled Keras train step cannot do; use FixedSubnetwork or RandomSynapses "
            "as the random control in Keras, or RandomUnits through the Lightning adapter"
        )


def _covered(v: Any, layers: Sequence[str] | None) -> bool:
    if layers is None:
        return True
    parts = str(v.path).split("/")
    return any(name in parts[:-1] for name in layers)


@keras.saving.register_keras_serializable(package="energy_callbacks")
class PlasticityOptimizer(keras.optimizers.Optimizer):
    """Wraps ``inner_optimizer``; applies ``plasticity``'s rules and meters the energy.

    ``plasticity`` is a core :class:`~energy_callbacks.Plasticity` (or its
    :func:`~energy_callbacks.core.config.to_config` dict). ``layers`` limits the
    rules and the meter to the named layers; other variables train as usual and
    are not counted. Saved models reload it through ``keras.models.load_model`` (with
    ``energy_callbacks.keras`` imported, which registers it).

    It applies the rules while a :class:`~energy_callbacks.keras.PlasticityCallback`
    fits with it (``driven``); fitted without one, it trains as its inner optimizer
    and warns, so a model loaded from a checkpoint trains as the user compiled it.
    """

    def __init__(
        self,
        inner_optimizer: Any,
        plasticity: Plasticity | Mapping[str, Any] | None = None,
        layers: Sequence[str] | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"PlasticityOptimizer takes no optimizer arguments ({sorted(kwargs)}); "
                "set them on the inner optimizer"
            )
        super().__init__(learning_rate=0.0, name=name)
        if isinstance(inner_optimizer, Mapping):
            try:
                inner_optimizer = keras.optimizers.deserialize(dict(inner_optimizer))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"PlasticityOptimizer.inner_optimizer: {inner_optimizer!r} is no serialized "
                    f"Keras optimizer ({exc!r})"
                ) from None
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise ValueError(
                f"PlasticityOptimizer.inner_optimizer must be a keras Optimizer, "
                f"got {inner_optimizer!r}"
            )
        if plasticity is None:
            plasticity = Plasticity()
        elif isinstance(plasticity, Mapping):
            try:
                plasticity = from_config(plasticity)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"PlasticityOptimizer.plasticity: {exc}") from None
        elif not isinstance(plasticity, Plasticity):
            raise ValueError(
                f"PlasticityOptimizer.plasticity must be a Plasticity(...), its to_config() "
                f"dict or None, got {plasticity!r}"
            )
        check_in_graph(plasticity)
        self.inner_optimizer = inner_optimizer
        self.plasticity = plasticity
        self.layers = checks.names("PlasticityOptimizer.layers", layers, "a layer name")
        self.gate = GateState(plasticity.samples)
        self._covered: list[int] = []
        self._model: Any = None  # the model whose layers and graph build() reads
        self._initial_pending = False
        # True while a PlasticityCallback fits with it; else it trains as its inner optimizer
        self.driven = False
        self._said_undriven = False
        self._caching: CachingVariables | None = None
        self._host: HostStep | None = None  # the torch backend's fused CPU step, if it fits

    # -- building ------------------------------------------------------------
    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    def build(self, var_list: Sequence[Any]) -> None:
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        self._covered = [i for i, v in enumerate(var_list) if _covered(v, self.layers)]
        if not self._covered:
            raise ValueError(
                f"PlasticityOptimizer.layers={self.layers} matches none of the trainable "
                f"variables {[v.path for v in var_list]}; name layers of the model"
            )
        covered = [var_list[i] for i in self._covered]
        model = self._model() if self._model is not None else None
        specs = describe(covered, owner_kinds(model) if model is not None else None)
        self._names = [t.name for t in specs]  # the callback's Plasticity may be rebound later
        wired = wiring(model, specs) if model is not None else None
        topology = Topology.chain(specs) if wired is None else Topology(specs, *wired)
        if self.plasticity.units is not None and not topology.hidden:
            self._no_hidden_layer(topology, model)
        # the meter keeps host (NumPy) totals; the rules trace keras.ops into the step
        self.plasticity.setup(topology, ops=numpy_ops)
        # torch on the CPU: the fused step's NumPy ops; else keras.ops, traced in-graph
        self._host = host_step_for(covered, self.plasticity)
        self.plasticity.ops = keras_ops if self._host is None else self._host.ops
        n = len(covered)
        with keras.name_scope(self.name, caller=self):
            self._totals = {
                name: self.add_variable((n,), initializer="zeros", dtype=dtype, name=name)
                for name, dtype in (
                    ("m1", "float32"),
                    ("m1_error", "float32"),
                    ("m_alpha", "float32"),
                    ("m_alpha_error", "float32"),
                    ("m0_low", "int32"),
                    ("m0_high", "int32"),
                )
            }
            self._counters = self.add_variable(
                (2,), initializer="zeros", dtype="int32", name="steps_skipped"
            )
            self._initial = [self.add_variable_from_reference(v, name="initial") for v in covered]
            if self.plasticity.caching is not None:
                self._caching = CachingVariables(self, self.plasticity.caching, covered)
            # the totals packed for the per-batch log: derived state, never saved
            self._readout = self.add_variable((4,), initializer="zeros", name="readout")
        # w_0: the weights now; TensorFlow builds a model fit builds inside the first
        # step's trace, where they have no value yet: the first step records them then
        self._initial_pending = tracing_on_tensorflow()
        if not self._initial_pending:
            for w0, v in zip(self._initial, covered, strict=True):
                w0.assign(ops.copy(v.value))  # a buffer of its own (JAX donates both)
        # XLA fuses the masks' passes on TensorFlow; measuring alone runs faster without
        # (its reductions of two inputs took 1.5 ms against 0.6 ms in TF's own kernels)
        computes = self.plasticity.restricts or self._caching is not None
        self._masked_step_fn = compiled_step(self._masked_step, computes)
        super().build(var_list)

    def _no_hidden_layer(self, topology: Topology, model: Any) -> None:
        """A unit rule with no hidden layer to act on: refused, unless frozen layers with
        units would be hidden once they train (then it waits for them, with a warning)."""
        names = [lyr.name for lyr in topology.layers]
        every = describe(model.weights, owner_kinds(model)) if model is not None else []
        frozen = {s.layer for s in every if s.input_axis is not None} - set(names)
        if frozen:
            warnings.warn(
                f"units={self.plasticity.units!r}: the trainable layers {names} are all "
                f"outputs; the frozen layers {sorted(frozen)} that would be hidden keep the "
                "unit rule idle until they train (compile again after unfreezing them)",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        raise ValueError(
            f"units={self.plasticity.units!r}: no layer of the model has units the rule could "
            f"select (the layers {names} are all outputs; EinsumDense and MultiHeadAttention "
            "have no unit axis), so it would change nothing. Drop units=."
        )

    def read_layers_of(self, model: Any) -> None:
        """Describe the variables by the layers of ``model`` that hold them, and read the
        wiring (outputs, links) off its graph when the optimizer is built; without a
        model, the variables' names and their order stand in."""
        self._model = weakref.ref(model)

    # -- the step --------------------------------------------------------------
    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None) -> Any:
        if not self.driven:
            if self._said_undriven:
                return self.inner_optimizer.apply(grads, trainable_variables)
            self._said_undriven = True  # once (torch runs this every step, eagerly)
            warnings.warn(
                f"PlasticityOptimizer: no PlasticityCallback is fitting with it (a model "
                "loaded from a checkpoint written during a plasticity fit?), so it trains as "
                f"its inner {type(self.inner_optimizer).__name__}: no rule, no energy. Pass "
                "the PlasticityCallback to fit to go on with the run, or compile with a plain "
                "optimizer.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.inner_optimizer.apply(grads, trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        variables = list(trainable_variables or self._trainable_variables)
        if self._host is not None:
            before = self._host.snapshot(variables)
        else:
            before = [_snapshot(v) for v in variables]
        if self._initial_pending:  # built in this trace: w_0 is the weights of step 0
            initial = [before[i] for i in self._covered]
            restore_unless(
                ops.not_equal(self.iterations, 0), list(zip(self._initial, initial, strict=True))
            )
        state = self.inner_optimizer.variables
        live = ops.convert_to_tensor(True)
        if self._skips_empty_steps:
            nonzero = [ops.any(ops.not_equal(g, 0)) for g in grads if g is not None]
            live = any_across_replicas(ops.any(ops.stack(nonzero)))
        scaler_skips = None  # a LossScaleOptimizer skips steps with inf/NaN gradients itself
        if isinstance(self.inner_optimizer, keras.optimizers.LossScaleOptimizer):
            scaler_skips = ops.logical_not(self.inner_optimizer.check_finite(grads))
        # A step nobody learns from or with NaN/Inf gradients leaves the optimizer's
        # state (moments, count) as it was, decided from the gradients before the
        # update. Where the backend can branch (torch; TensorFlow without a strategy)
        # the update does not run then; JAX runs the inner optimizer's stateless
        # update under a jax.lax.cond. (Selecting the old state back after the update
        # held a copy of a moment per tensor: XLA fused the new moment into both the
        # select and the weights' update, which then read the old one after the select
        # had overwritten it.) Either way no copy of the state is kept to undo a step
        # that goes wrong after the update: its proposal is then undone, not the moments.
        jax = keras.backend.backend() == "jax"
        branch = scaler_skips is None and (can_branch() or jax)
        state_before = None if branch else [_snapshot(v) for v in state]
        grads_finite = ops.convert_to_tensor(True)
        if branch:
            grads_finite = (
                _all_finite(grads) if self._host is None else self._host.all_finite(grads)
            )
        proceed = ops.logical_and(live, grads_finite)
        if branch and jax:
            self._stateless_update_if(proceed, grads, variables)
        elif branch:  # NaN/Inf gradients: the update does not run, and the step is skipped
            run_if(proceed, lambda: self.inner_optimizer.apply(grads, variables))
        elif scaler_skips is not None and jax:
            # its stateful apply assigns inside a jax cond: run its stateless form instead
            new_values, new_state = self.inner_optimizer.stateless_apply(
                [v.value for v in state], grads, [v.value for v in variables]
            )
            assign_all(
                list(zip(variables, new_values, strict=True))
                + list(zip(state, new_state, strict=True))
            )
        else:
            self.inner_optimizer.apply(grads, variables)

        after = [v.value for v in variables]
        store = None if self._caching is None else [s.value for s in self._caching.store]
        final, m1, m0, m_alpha, finite, go, cached = self._masked_step_fn(
            before, after, live, grads_finite, store
        )
        metered = self._metered(m1, m0, m_alpha, go, finite, scaler_skips)
        if self._caching is not None:
            metered += self._caching.metered(*cached)
        metered.append((self._readout, self._readout_value(metered)))
        if final is None:  # measure only: the weights change unless the step is skipped
            assign_all(metered)
            # a skipped step leaves no trace in the optimizer either (Adam's count, moments)
            restored = list(zip(variables, before, strict=True))
            if state_before is not None:
                restored += list(zip(state, state_before, strict=True))
            restore_unless(go, restored)
            return
        assigned = list(zip(variables, final, strict=True)) + metered
        if state_before is not None:
            assigned += [
                (v, ops.where(go, v.value, b)) for v, b in zip(state, state_before, strict=True)
            ]
        assign_all(assigned)

    def _stateless_update_if(self, flag: Any, grads: Sequence[Any], variables: list[Any]) -> None:
        """JAX: the inner optimizer's update of ``variables`` and of its state where
        ``flag`` is True, both left as they are where it is False (one branch runs)."""
        import jax

        if not isinstance(flag, jax.core.Tracer):  # an eager step (jit_compile=False)
            if bool(flag):
                self.inner_optimizer.apply(grads, variables)
            return
        state = self.inner_optimizer.variables
        old = ([v.value for v in variables], [v.value for v in state])

        def update() -> Any:
            return self.inner_optimizer.stateless_apply(old[1], grads, old[0])

        new_values, new_state = jax.lax.cond(flag, update, lambda: old)
        assign_all(
            list(zip(variables, new_values, strict=True)) + list(zip(state, new_state, strict=True))
        )

    @property
    def _writes_weights(self) -> bool:
        """True when the step computes the weights' values (masks or a caching decay).
        Otherwise they keep the inner optimizer's update, restored for a skipped step."""
        decays = self._caching is not None and math.isfinite(self._caching.caching.tau)
        return self.plasticity.restricts or decays

    def _masked_step(
        self,
        before: list[Any],
        after: list[Any],
        live: Any,
        grads_finite: Any,
        store: list[Any] | None = None,
    ) -> tuple:
        """The step as a pure function: new values of the variables (None when no rule
        restricts and no caching store decays: then they are ``after``, or ``before`` for
        a skipped step), per-tensor M1, M0 and M_alpha of the real change, finiteness
        (of the proposal, and ``grads_finite``: the gradients' when the update ran
        under a branch),
        whether the step goes ahead, and the caching outputs (the store's new values and
        the step's figures; None without caching)."""
        covered = self._covered
        if self._host is not None:  # torch on the CPU: masked and measured in place
            return self._host.step(self.plasticity, covered, before, after, live, grads_finite)
        caching = self._caching is not None and store is not None
        if not self._writes_weights and not caching:  # measuring only: totals slice by slice
            alpha = self.plasticity.alpha
            figures = [change_totals(after[i], before[i], alpha) for i in covered]
            sums = ops.stack([f[0] for f in figures])
            finite = ops.logical_and(ops.all(ops.isfinite(sums)), grads_finite)
            go = ops.logical_and(finite, live)
            m_alpha = ops.stack([f[2] for f in figures]) if alpha != 1.0 else sums
            return (
                None,
                ops.where(go, sums, 0.0),
                ops.where(go, ops.stack([f[1] for f in figures]), 0),
                ops.where(go, m_alpha, 0.0),
                finite,
                go,
                None,
            )
        # compiled (TF, JAX): the proposals stay unwritten, each pass reads after - before
        unwritten = keras.backend.backend() != "torch"
        proposed: list[Any] = [
            Difference(after[i], before[i]) if unwritten else after[i] - before[i] for i in covered
        ]
        masks = self.plasticity.masks(proposed)
        alpha = self.plasticity.alpha
        # Per tensor, the figures of what it keeps (unmasked: all of it); a NaN/Inf
        # anywhere in the proposal makes the sum of all of it non-finite. Compiled, they
        # are read slice by slice from after and before; eager torch reads its proposal,
        # let go once read, so that it holds one tensor's at a time.
        sums, checks, counts, powers, kept = [], [], [], [], []
        for j, (i, m) in enumerate(zip(covered, masks, strict=True)):
            p = proposed[j]
            if isinstance(p, Difference):
                m1_j, m0_j, m_alpha_j, whole = change_totals(after[i], before[i], alpha, m)
            else:
                c = p if m is None else ops.where(m, p, ops.zeros_like(p))
                m1_j, m0_j = ops.sum(ops.abs(c)), keras_ops.count_nonzero(c)
                m_alpha_j = m1_j if alpha == 1.0 else keras_ops.total(c, alpha)
                whole = m1_j if m is None else ops.sum(p)
            sums.append(m1_j)
            checks.append(whole)
            counts.append(m0_j)
            powers.append(m_alpha_j)
            if caching:  # compiled: the Difference and its mask, read a slice at a time
                if isinstance(p, Difference):
                    kept.append((p, m))
                else:
                    kept.append(p if m is None else ops.where(m, p, ops.zeros_like(p)))
            proposed[j] = p = c = None
        finite = ops.logical_and(ops.all(ops.isfinite(ops.stack(checks))), grads_finite)
        go = ops.logical_and(finite, live)
        final = None
        if self._writes_weights:
            keep: list[Any] = [go] * len(after)
            for i, m in zip(covered, masks, strict=True):
                if m is not None:
                    keep[i] = ops.logical_and(m, go)
            final = [ops.where(k, a, b) for a, b, k in zip(after, before, keep, strict=True)]
        cached = None
        if caching:
            final, new_store, figures = self._caching.step(final, covered, kept, store, go)
            cached = (new_store, figures)
        m1 = ops.where(go, ops.stack(sums), 0.0)
        m0 = ops.where(go, ops.stack(counts), 0)
        m_alpha = m1 if alpha == 1.0 else ops.where(go, ops.stack(powers), 0.0)
        return final, m1, m0, m_alpha, finite, go, cached

    @property
    def _skips_empty_steps(self) -> bool:
        accumulating = self.inner_optimizer.gradient_accumulation_steps
        return self.plasticity.samples is not None and not accumulating

    def _metered(
        self, m1: Any, m0: Any, m_alpha: Any, applied: Any, finite: Any, scaler_skips: Any = None
    ) -> list[tuple[Any, Any]]:
        """The accumulators' new values after a step with per-tensor ``m1``, ``m0``.

        ``scaler_skips`` is True for a step the inner loss scaler skipped: it changed no
        weight (its energy is 0) and counts as skipped, not as a step.
        """
        skipped = ops.logical_not(finite)
        if scaler_skips is not None:
            applied = ops.logical_and(applied, ops.logical_not(scaler_skips))
            skipped = ops.logical_or(skipped, scaler_skips)
        acc = self._totals
        out = two_sum_update(acc["m1"], acc["m1_error"], m1)
        if self.plasticity.alpha != 1.0:
            out += two_sum_update(acc["m_alpha"], acc["m_alpha_error"], m_alpha)
        low, high = carry_count(acc["m0_low"].value, acc["m0_high"].value, m0)
        counters = self._counters.value + ops.stack(
            [ops.cast(applied, "int32"), ops.cast(skipped, "int32")]
        )
        return out + [
            (acc["m0_low"], low),
            (acc["m0_high"], high),
            (self._counters, counters),
        ]

    def _readout_value(self, new: Sequence[tuple[Any, Any]] = ()) -> Any:
        """The packed totals (:func:`~energy_callbacks.keras.totals.readout`) after the
        assignments ``new``; with caching, consolidation + maintenance and the writes."""
        values = {id(v): x for v, x in new}

        def value(name: str, source: Mapping[str, Any]) -> Any:
            v = source[name]
            return values.get(id(v), v.value)

        if self._caching is None:
            acc = self._totals
            energy = [(value("m1", acc), value("m1_error", acc))]
            count = (value("m0_low", acc), value("m0_high", acc))
        else:
            acc = self._caching.totals
            energy = [
                (value(k, acc), value(f"{k}_error", acc)) for k in ("consolidation", "maintenance")
            ]
            count = (value("consolidations_low", acc), value("consolidations_high", acc))
        return readout(energy, count)

    def refresh_readout(self) -> None:
        """Recompute the packed totals on the host (after a load, a carry-over, or the
        consolidation at the end of fit)."""
        self._readout.assign(self._readout_value())

    def save_own_variables(self, store: Any) -> None:
        for i, v in enumerate(self._saved_variables()):
            store[str(i)] = v.numpy()

    def load_own_variables(self, store: Any) -> None:
        saved = self._saved_variables()
        if not self.built:
            super().load_own_variables(store)  # Keras warns that it skips the load
            return
        if len(store.keys()) != len(saved):
            raise ValueError(
                f"PlasticityOptimizer: the checkpoint holds {len(store.keys())} optimizer "
                f"variables, this optimizer has {len(saved)}; resume with the same model, "
                "rules, layers= and inner optimizer"
            )
        for i, v in enumerate(saved):
            v.assign(store[str(i)])
        self.refresh_readout()

    def _saved_variables(self) -> list[Any]:
        """What a checkpoint holds: every variable but the readout, which is derived."""
        readout_var = getattr(self, "_readout", None)
        return [v for v in self.variables if v is not readout_var]

    # -- what the callback reads ----------------------------------------------
    def _reader(self, values: Sequence[Any] | None) -> Callable[[Any], np.ndarray]:
        """``read(variable) -> array``: from ``values`` (the current values of
        :attr:`variables`, e.g. the JAX trainer's state) or from the variables."""
        if values is None:
            return lambda v: np.asarray(v.numpy())
        own = {id(v): i for i, v in enumerate(self._variables)}
        return lambda v: np.asarray(values[own[id(v)]])

    def energy_state(self, values: Sequence[Any] | None = None) -> dict[str, Any]:
        """The core :class:`~energy_callbacks.core.EnergyMeter` state of the totals so far.

        ``values`` are the current values of :attr:`variables` when they live outside
        the variables (the JAX trainer's state mid-epoch); by default, the variables.
        """
        read = self._reader(values)
        acc = {k: read(v) for k, v in self._totals.items()}
        steps, skipped = (int(x) for x in read(self._counters))
        m1 = acc["m1"].astype(np.float64) + acc["m1_error"]
        m_alpha = (
            acc["m_alpha"].astype(np.float64) + acc["m_alpha_error"]
            if self.plasticity.alpha != 1.0
            else m1
        )
        m0 = (acc["m0_high"].astype(np.int64) << COUNT_BITS) + acc["m0_low"]
        variables = [self._trainable_variables[i] for i in self._covered]
        weight = self._flat(None)
        initial = self._flat(values)
        net = [
            net_change(weight(v), initial(w0), read=ops.convert_to_numpy)
            for v, w0 in zip(variables, self._initial, strict=True)
        ]
        return {
            "names": [t.name for t in self.plasticity.topology.tensors],
            "m1": m1,
            "m_alpha": m_alpha,
            "m0": m0,
            "displacement": [None] * len(net),  # measured against w_0: m1_min, m0_min
            "m1_min": np.array([m for m, _ in net], dtype=np.float64),
            "m0_min": np.array([c for _, c in net], dtype=np.int64),
            "steps": steps,
            "skipped_steps": skipped,
        }

    def _flat(self, values: Sequence[Any] | None) -> Callable[[Any], Any]:
        """``flat(variable)``: its current value, flat, as a backend tensor that
        :func:`~energy_callbacks.core.energy.net_change` reads slice by slice (no host
        copy of the whole tensor); ``values`` as in :meth:`energy_state`."""
        if values is None:
            return lambda v: ops.reshape(v.value, (-1,))
        own = {id(v): i for i, v in enumerate(self._variables)}
        return lambda v: ops.reshape(values[own[id(v)]], (-1,))

    def caching_state(self, values: Sequence[Any] | None = None) -> dict[str, Any]:
        """The core :class:`~energy_callbacks.core.caching.Caching` state: store and totals
        (``values`` as in :meth:`energy_state`)."""
        if self._caching is None:
            raise RuntimeError("PlasticityOptimizer.caching_state(): the rules have no caching")
        names = [t.name for t in self.plasticity.topology.tensors]
        return self._caching.state(names, self._reader(values))

    def caching_figures(self) -> tuple[dict[str, Any], list[float]]:
        """The caching totals (:meth:`caching_state` without the store) and what the
        store holds per tensor, for :meth:`Caching.load_figures`."""
        if self._caching is None:
            raise RuntimeError("PlasticityOptimizer.caching_figures(): the rules have no caching")
        names = [t.name for t in self.plasticity.topology.tensors]
        return self._caching.figures(names, self._reader(None))

    def consolidate(self) -> None:
        """Synaptic caching: consolidate the whole transient store (the end of fit)."""
        if self._caching is None:
            raise RuntimeError("PlasticityOptimizer.consolidate(): the rules have no caching")
        self._caching.consolidate()
        self.refresh_readout()

    def totals(self, values: Sequence[Any] | None = None) -> tuple[float, int]:
        """``(M1, M0)`` so far (with caching: energy and writes), cheap enough for every
        batch: one read of the packed totals (all of them past 1.7e13 updates)."""
        packed = read_readout(self._reader(values)(self._readout))
        if packed is not None:
            return packed
        if self._caching is not None:
            return self._caching.host_totals(self._reader(values))
        own = {id(v): i for i, v in enumerate(self._variables)}
        acc = self._totals
        if values is None:
            hi, lo = acc["m1"].numpy(), acc["m1_error"].numpy()
            c_lo, c_hi = acc["m0_low"].numpy(), acc["m0_high"].numpy()
        else:
            hi, lo, c_lo, c_hi = (
                values[own[id(acc[k])]] for k in ("m1", "m1_error", "m0_low", "m0_high")
            )
        m1 = float(np.sum(np.asarray(hi, np.float64) + np.asarray(lo, np.float64)))
        m0 = int(np.sum((np.asarray(c_hi, np.int64) << COUNT_BITS) + np.asarray(c_lo)))
        return m1, m0

    # -- delegation and serialization -------------------------------------------
    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        self.inner_optimizer.learning_rate = value

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "plasticity": to_config(self.plasticity),
            "layers": self.layers,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Any:
        config = dict(config)
        config["inner_optimizer"] = keras.saving.deserialize_keras_object(
            config["inner_optimizer"], custom_objects=custom_objects
        )
        return cls(**config)


def _all_finite(grads: Sequence[Any]) -> Any:
    """True when no gradient holds NaN/Inf, on every replica (a boolean scalar)."""
    return ops.logical_not(any_across_replicas(ops.logical_not(all_finite(list(grads)))))


def _snapshot(variable: Any) -> Any:
    """The variable's current value, safe from the coming in-place update.

    JAX arrays are immutable. TensorFlow and torch update variables in place (a
    TF read inside the step can alias the buffer), so they are copied.
    """
    if keras.backend.backend() == "jax":
        return variable.value
    return ops.copy(variable.value)
