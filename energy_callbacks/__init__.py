"""energy_callbacks: measure and reduce the plasticity energy of training.

The public rule and report names live here; framework adapters are imported
from their own modules (``energy_callbacks.lightning``, ``energy_callbacks.keras``)
so that importing this package pulls in no deep-learning framework.
"""

from .core import (
    Caching,
    Cost,
    EnergyReport,
    FixedSubnetwork,
    Lazy,
    Margin,
    MemorizedMistakes,
    Plasticity,
    RandomSynapses,
    RandomUnits,
    TensorSpec,
    Threshold,
    TopFraction,
    Topology,
    TopUnits,
)

__version__ = "0.1.0"

__all__ = [
    "Caching",
    "Cost",
    "EnergyReport",
    "FixedSubnetwork",
    "Lazy",
    "Margin",
    "MemorizedMistakes",
    "Plasticity",
    "RandomSynapses",
    "RandomUnits",
    "TensorSpec",
    "Threshold",
    "TopFraction",
    "TopUnits",
    "Topology",
    "__version__",
]
