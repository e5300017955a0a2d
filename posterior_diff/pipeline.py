"""Deprecated: `posterior_diff.pipeline` has moved to `posterior_diff.apps.pipeline`;
this shim goes in the next release.

Diffusers may also load this file by its path (`custom_pipeline=`); it finds the pipeline class here too."""

from posterior_diff._moved import forward

__getattr__, __dir__ = forward("posterior_diff.pipeline")
