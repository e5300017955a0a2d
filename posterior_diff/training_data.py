"""Deprecated: `posterior_diff.training_data` has moved to `posterior_diff.training.data`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.training_data")
