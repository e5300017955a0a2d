"""Deprecated: `posterior_diff.command_options` has moved to `posterior_diff.apps.command_options`;
this shim goes in the next release."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.command_options")
