"""Deprecated: `posterior_diff.cli` has moved to `posterior_diff.apps.cli`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.cli")
