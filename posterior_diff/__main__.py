"""`python -m posterior_diff ...` is the `posterior-diff` command (also under torchrun and accelerate launch)."""

import sys

from posterior_diff.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
