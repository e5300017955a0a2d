"""Entry points built on `restore`: the `posterior-diff` command (`cli`, with `command_options`
shared with its dataset runs, `dataset`) and the diffusers pipeline (`pipeline`).

The top room: it imports every room below it, and no module below imports it. `pipeline.py`
imports absolute names only, since diffusers also loads it by its file path.
"""
