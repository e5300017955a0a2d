"""Deprecated: `posterior_diff.model_formats` has moved to `posterior_diff.models.formats`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.model_formats")
