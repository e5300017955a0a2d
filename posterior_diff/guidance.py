"""Deprecated: `posterior_diff.guidance` has moved to `posterior_diff.sampling.guidance`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.guidance")
