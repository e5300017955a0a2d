"""Deprecated: `posterior_diff.metrics` has moved to `posterior_diff.evaluation.metrics`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.metrics")
