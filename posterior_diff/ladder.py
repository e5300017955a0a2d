"""Deprecated: `posterior_diff.ladder` has moved to `posterior_diff.models.ladder`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.ladder")
