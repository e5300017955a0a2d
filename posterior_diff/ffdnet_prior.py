"""Deprecated: `posterior_diff.ffdnet_prior` has moved to `posterior_diff.models.ffdnet_prior`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.ffdnet_prior")
