"""Deprecated: `posterior_diff.priors` has moved to `posterior_diff.models.priors`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.priors")
