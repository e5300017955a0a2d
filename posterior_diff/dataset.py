"""Deprecated: `posterior_diff.dataset` has moved to `posterior_diff.apps.dataset`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.dataset")
