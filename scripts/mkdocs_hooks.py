"""MkDocs hooks for `make docs` (mkdocs.yml: `hooks:`).

A docs page may link to a repository file outside docs/ (`../benchmarks/speed.py`): such a link
works when the page is read on the repository, but MkDocs cannot follow it and reports it at the
level of `validation.links.not_found`, the same level as a link to a missing docs page. This
hook lowers that report to INFO for targets that exist in the repository outside docs/, so
that `mkdocs build --strict` still fails on every broken link, and only on those.
(tests/test_docs.py checks all relative links, these included, against the files.)
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

_MESSAGE = re.compile(r"^Doc file '(?P<page>[^']+)' contains a link '(?P<url>[^']+)', but the target")


class _OutsideDocsLinks(logging.Filter):
    """Lower to INFO the not-found reports of links to existing files outside docs_dir."""

    def __init__(self, docs_dir: Path) -> None:
        super().__init__()
        self.docs_dir = docs_dir

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        match = _MESSAGE.match(record.getMessage())
        if match is None:
            return True
        path = unquote(urlsplit(match["url"]).path)
        target = (self.docs_dir / posixpath.dirname(match["page"]) / path).resolve()
        if target.exists() and not target.is_relative_to(self.docs_dir):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"{record.getMessage()} (a repository file outside docs/: kept)", ()
        return True


def on_config(config):
    logger = logging.getLogger("mkdocs.structure.pages")
    for old in [f for f in logger.filters if isinstance(f, _OutsideDocsLinks)]:
        logger.removeFilter(old)
    logger.addFilter(_OutsideDocsLinks(Path(config["docs_dir"]).resolve()))
    return config
