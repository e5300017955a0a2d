"""Deprecated: `posterior_diff.time_grids` has moved to `posterior_diff.sampling.time_grids`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.time_grids")
