"""The configurations every overhead benchmark compares, as callback arguments.

``None`` is the plain run without a callback; the others are keyword arguments
for either framework's ``PlasticityCallback``, so the Lightning and Keras rows
measure the same rules.
"""

from energy_callbacks import TopFraction, TopUnits

RULES: dict[str, dict | None] = {
    "plain": None,
    "tracking only": {},
    "TopFraction(0.1)": {"synapses": TopFraction(0.1)},
    "TopFraction(0.1, approximate=True)": {"synapses": TopFraction(0.1, approximate=True)},
    "combined (path 10% units + top 10%)": {
        "units": TopUnits(0.1, path=True),
        "synapses": 0.1,
    },
}


def configs(callback_class):
    """``{name: None or a factory of a fresh callback}`` for ``callback_class``."""
    return {
        name: None if kwargs is None else (lambda kwargs=kwargs: callback_class(**kwargs))
        for name, kwargs in RULES.items()
    }
