"""A text file listing image paths, one per line (``wanwu run @list.txt``)."""

from __future__ import annotations

import logging
import os
from typing import Iterator

from wanwu.errors import ConfigError
from wanwu.stages.sources.base import Source, SourceItem
from wanwu.stages.sources.files import key_text, read_file

logger = logging.getLogger(__name__)


class ListFileSource(Source):
    """The paths listed in a UTF-8 text file, in the order listed.

    Lines are stripped of surrounding white space; blank lines and lines starting
    with ``#`` are skipped. A relative path is relative to the list file's folder,
    not to the working directory, so a list travels with the files it names. Paths
    are taken literally (no ``~`` or variable expansion). A line listed twice is
    yielded once. A path that does not exist is still yielded; reading it raises
    ``ReadError``, so it becomes an error record instead of disappearing.

    Items: ``key`` is the line as written (stripped), ``source`` the list file as
    given, ``locator`` the absolute path.
    """

    kind = "list"

    def scan(self) -> Iterator[SourceItem]:
        """Yield every distinct listed path once, in list order.

        Raises:
            ConfigError: the list file cannot be read.
        """
        seen: set[str] = set()
        for item in self._scan_range(None, None):
            if item.key not in seen:
                seen.add(item.key)
                yield item

    def _scan_range(self, start: str | None, stop: str | None) -> Iterator[SourceItem]:
        """Positions are byte offsets of the lines: a shard seeks straight to its first line."""
        base = os.path.dirname(os.path.abspath(self.location))
        offset, end = int(start or 0), None if stop is None else int(stop)
        try:
            with open(self.location, "rb") as lines:
                lines.seek(offset)
                for raw in lines:
                    if end is not None and offset >= end:
                        return
                    here, offset = offset, offset + len(raw)
                    # surrogateescape keeps a non-UTF-8 path usable as a locator;
                    # key_text() then gives it a key the sinks can write.
                    line = raw.decode("utf-8", "surrogateescape")
                    if here == 0:
                        line = line.removeprefix("\ufeff")  # a BOM some editors add
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    yield SourceItem(
                        key=key_text(line),
                        source=self.location,
                        locator=os.path.join(base, line),  # no normpath: '..' after a symlink
                        position=str(here),
                    )
        except OSError as exc:
            raise ConfigError(f"expected a readable list file, got {self.location!r}: {exc}") from exc

    def read(self, item: SourceItem, max_bytes: int | None = None) -> bytes:
        """The listed file's bytes. Raises ``ReadError`` if it is missing, empty, unreadable or too large."""
        return read_file(item.locator, max_bytes)
