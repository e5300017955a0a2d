"""Deprecated: `posterior_diff.problems` has moved to `posterior_diff.evaluation.problems`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.problems")
