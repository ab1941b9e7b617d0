"""The framework-free core: energy accounting and plasticity rules.

Nothing here imports torch, keras, tensorflow or jax. Rules are written against
:class:`~energy_callbacks.core.ops.ArrayOps`; the NumPy implementation
(:data:`~energy_callbacks.core.ops.numpy_ops`) is the reference oracle.
"""

from .caching import Caching
from .costs import BIOLOGY_JOULES_PER_BIT, PRESETS, Cost
from .energy import EnergyMeter, EnergyReport, LayerEnergy
from .memory import MistakeMemory
from .ops import ArrayOps, NumpyOps, numpy_ops
from .plasticity import GateResult, Plasticity, Step
from .samples import Lazy, Margin, MemorizedMistakes, SampleGate
from .synapses import RandomSynapses, SynapseRule, Threshold, TopFraction, keep_count
from .topology import Layer, TensorSpec, Topology
from .units import FixedSubnetwork, RandomUnits, TopUnits, UnitRule

__all__ = [
    "BIOLOGY_JOULES_PER_BIT",
    "PRESETS",
    "ArrayOps",
    "Caching",
    "Cost",
    "EnergyMeter",
    "EnergyReport",
    "FixedSubnetwork",
    "GateResult",
    "Layer",
    "LayerEnergy",
    "Lazy",
    "Margin",
    "MemorizedMistakes",
    "MistakeMemory",
    "NumpyOps",
    "Plasticity",
    "RandomSynapses",
    "RandomUnits",
    "SampleGate",
    "Step",
    "SynapseRule",
    "TensorSpec",
    "Threshold",
    "TopFraction",
    "TopUnits",
    "Topology",
    "UnitRule",
    "keep_count",
    "numpy_ops",
]
