"""The module paths that moved when the package got its rooms, each kept for one release.

Every old path below is a small shim module at its old place (`posterior_diff/guidance.py`, ...).
A name taken from it is the very object of the new module, with a DeprecationWarning that names
the new path; the shims and this table go in the next release. (`posterior_diff.models`,
`posterior_diff.evaluation` and `posterior_diff.training` were modules and are now the packages
of their rooms, which keep the old modules' public names without a warning.)
"""

from __future__ import annotations

import importlib
import warnings

MOVED = {
    "posterior_diff.model_formats": "posterior_diff.models.formats",
    "posterior_diff.priors": "posterior_diff.models.priors",
    "posterior_diff.deepinv_prior": "posterior_diff.models.deepinv_prior",
    "posterior_diff.ffdnet_prior": "posterior_diff.models.ffdnet_prior",
    "posterior_diff.ladder": "posterior_diff.models.ladder",
    "posterior_diff.time_grids": "posterior_diff.sampling.time_grids",
    "posterior_diff.samplers": "posterior_diff.sampling.samplers",
    "posterior_diff.guidance": "posterior_diff.sampling.guidance",
    "posterior_diff.particles": "posterior_diff.sampling.particles",
    "posterior_diff.metrics": "posterior_diff.evaluation.metrics",
    "posterior_diff.problems": "posterior_diff.evaluation.problems",
    "posterior_diff.training_data": "posterior_diff.training.data",
    "posterior_diff.cli": "posterior_diff.apps.cli",
    "posterior_diff.command_options": "posterior_diff.apps.command_options",
    "posterior_diff.dataset": "posterior_diff.apps.dataset",
    "posterior_diff.pipeline": "posterior_diff.apps.pipeline",
}


def forward(old: str):
    """The `__getattr__` and `__dir__` of the shim at the old path `old`: each name comes from the
    new module, with a DeprecationWarning naming it (PEP 562 module attributes)."""
    new = MOVED[old]

    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__") and name != "__all__":
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} has moved to {new}: import {name} from {new} (the old path goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    def __dir__() -> list[str]:
        return dir(importlib.import_module(new))

    return __getattr__, __dir__
