"""Registered baseline families (one module each) and the :class:`BaselineFamily` they implement.

``get_family("baseline/drbn@1")`` is the one place the pipeline learns what a baseline is; importing this
package registers every shipped family and its ``baseline/<name>@<version>`` builder. A new baseline is a
network in ``models/``, one module here that calls :func:`register_family`, and its recipes.
"""

from __future__ import annotations

from components.baselines import drbn as _drbn  # noqa: E402, F401, I001 - registers the family
from components.baselines import hwmnet as _hwmnet  # noqa: E402, F401 - registers the family
from components.baselines import kind as _kind  # noqa: E402, F401 - registers the families
from components.baselines import llflow as _llflow  # noqa: E402, F401 - registers the families
from components.baselines import retinexnet as _retinexnet  # noqa: E402, F401 - registers the family
from components.baselines import snr_net as _snr_net  # noqa: E402, F401 - registers the family
from components.baselines.family import (
    BaselineFamily,
    PriorsFor,
    SESlot,
    UnknownFamilyError,
    families,
    get_family,
    register_family,
)
from components.baselines.official import load_official_weights

__all__ = [
    "BaselineFamily",
    "PriorsFor",
    "SESlot",
    "UnknownFamilyError",
    "families",
    "get_family",
    "load_official_weights",
    "register_family",
]
