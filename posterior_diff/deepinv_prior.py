"""Deprecated: `posterior_diff.deepinv_prior` has moved to `posterior_diff.models.deepinv_prior`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.deepinv_prior")
