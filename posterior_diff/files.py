"""Files written atomically: a hidden temporary file in the destination's folder, renamed into place.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one. The
dataset command line writes its outputs this way, the trainer its checkpoints, and the
benchmarks their caches.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

TEMPORARY = ".partial"  # in the names of files being written: .NAME.XXXX.partial.SUFFIX
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: the permissions an ordinary new file gets here


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary)` on a hidden file in `path`'s folder, then rename it to `path`;
    on any failure or interruption the temporary file is removed and `path` is untouched."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY + path.suffix)
    os.close(handle)
    try:
        write(Path(name))
        os.chmod(name, 0o666 & ~UMASK)  # mkstemp's files are private; an output is an ordinary file
        os.replace(name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def write_text_atomic(text: str, path: Path) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda temporary: temporary.write_text(text))
