"""Deprecated: `posterior_diff.particles` has moved to `posterior_diff.sampling.particles`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.particles")
