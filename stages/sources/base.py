"""Sources enumerate inputs and read their encoded bytes.

Contract: ``scan()`` yields every input exactly once, in a deterministic order
(so a resumed job sees the same stream), without reading image bytes;
``read(item)`` returns the encoded bytes or raises ``ReadError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Iterator

from wanwu.errors import ConfigError
from wanwu.registry import Registry

# Extensions a folder scan picks up (compared lower-case).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)


@dataclass(frozen=True)
class SourceItem:
    """One input, as the loader sees it before reading it."""

    key: str  # unique name of the input within the job; the record's "key"
    source: str  # the folder, list file or archive it came from; the record's "source"
    locator: str  # how the source finds it again: an absolute path, or an LMDB key


class Source(ABC):
    """Base of every source."""

    kind: ClassVar[str] = "base"

    def __init__(self, location: str) -> None:
        self.location = location
        self._closed = False

    @abstractmethod
    def scan(self) -> Iterator[SourceItem]:
        """Yield every input once, in a deterministic order."""

    @abstractmethod
    def read(self, item: SourceItem) -> bytes | memoryview:
        """The encoded bytes of ``item``. Raises ``ReadError`` if they cannot be read."""

    def shutdown(self) -> None:
        """Close files or environments. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._shutdown()

    def _shutdown(self) -> None:
        """Hook for subclasses holding resources."""


SOURCES: Registry[Source] = Registry("source")
SOURCES.register("folder", "wanwu.stages.sources.folder:FolderSource")
SOURCES.register("list", "wanwu.stages.sources.listfile:ListFileSource")
SOURCES.register("lmdb", "wanwu.stages.sources.lmdb:LmdbSource")


def source_kind(location: str) -> str:
    """Which source a command-line input names: ``@list.txt``, an LMDB archive, or a folder."""
    import os

    if location.startswith("@"):
        return "list"
    if os.path.isdir(location):
        # An LMDB environment is a folder holding data.mdb.
        return "lmdb" if os.path.isfile(os.path.join(location, "data.mdb")) else "folder"
    if os.path.isfile(location) and location.endswith((".lmdb", ".mdb")):
        return "lmdb"
    raise ConfigError(f"expected a folder, an LMDB archive or @list.txt, got {location!r}")


def job_key(location: str, item: SourceItem, several_inputs: bool) -> str:
    """The key of ``item`` within a job: with several inputs, folder and archive keys get
    the input as given as a prefix, so the same name in two folders stays two records
    (list-file keys are already the paths as written)."""
    if several_inputs and source_kind(location) != "list":
        return f"{location.rstrip('/')}/{item.key}"
    return item.key


def open_source(location: str) -> Source:
    """Build the source for one command-line input."""
    kind = source_kind(location)
    return SOURCES.create(kind, location[1:] if kind == "list" else location)
