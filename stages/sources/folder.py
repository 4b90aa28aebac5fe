"""A folder of image files, walked recursively."""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator

from wanwu.errors import ConfigError
from wanwu.stages.sources.base import IMAGE_EXTENSIONS, Source, SourceItem
from wanwu.stages.sources.files import key_text, read_file

logger = logging.getLogger(__name__)


class FolderSource(Source):
    """Every image file under a folder, at any depth.

    ``scan()`` walks depth-first; within each folder, entries are taken in order of
    name (files and sub-folders interleaved), so two scans of an unchanged tree give
    the same stream. A file counts as an image when its extension, lower-cased, is
    in ``IMAGE_EXTENSIONS``. Symlinked files are read; symlinked folders are not
    entered, which rules out loops. Sub-folders that cannot be listed are logged and
    skipped.

    Items: ``key`` is the path relative to the folder with ``/`` separators,
    ``source`` the folder as given, ``locator`` the absolute path.
    """

    kind = "folder"

    def scan(self) -> Iterator[SourceItem]:
        """Yield every image file once, in a deterministic order.

        Raises:
            ConfigError: the folder itself cannot be listed.
        """
        return self._scan_range(None, None)

    def _scan_range(self, start: str | None, stop: str | None) -> Iterator[SourceItem]:
        """Positions are the relative paths; only the sub-folders that can hold the range are listed."""
        root = os.path.abspath(self.location)
        try:
            for rel in walk_images(root, start=_parts(start), stop=None if stop is None else _parts(stop)):
                yield SourceItem(key=key_text(rel), source=self.location, locator=os.path.join(root, rel),
                                 position=rel)
        except OSError as exc:
            raise ConfigError(f"expected a readable folder, got {self.location!r}: {exc}") from exc

    def read(self, item: SourceItem, max_bytes: int | None = None) -> bytes:
        """The file's bytes. Raises ``ReadError`` if it is empty, vanished, unreadable or too large."""
        return read_file(item.locator, max_bytes)


def walk_images(root: str, prune: Callable[[os.DirEntry[str]], bool] | None = None,
                start: tuple[str, ...] = (), stop: tuple[str, ...] | None = None) -> Iterator[str]:
    """Paths (relative to ``root``, ``/``-separated) of the image files under ``root``, at any depth.

    Depth-first; within each folder, entries in order of name (files and sub-folders
    interleaved), so two walks of an unchanged tree agree, and the paths come in the
    order of their tuples of components. ``start`` and ``stop`` (such tuples) keep
    the paths in ``[start, stop)``; sub-folders wholly outside are not listed.
    Symlinked folders are not entered (no loops); sub-folders that cannot be listed
    are logged and skipped. ``prune(entry)`` True leaves a file or folder out.

    Raises:
        OSError: ``root`` itself cannot be listed.
    """
    # An explicit stack of iterators instead of recursion: deep trees cannot
    # hit the recursion limit, and the walk stays lazy.
    stack: list[tuple[tuple[str, ...], Iterator[os.DirEntry[str]]]] = [((), iter(_sorted_entries(root)))]
    while stack:
        parts, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if prune is not None and prune(entry):
            continue
        path = parts + (entry.name,)
        if _is_real_dir(entry):
            depth = len(path)
            if path < start[:depth]:  # all it holds comes before start
                continue
            if stop is not None and path > stop[:depth]:  # all it holds comes at or after stop
                return
            try:
                stack.append((path, iter(_sorted_entries(entry.path))))
            except OSError as exc:
                logger.warning("skipping folder %r: %s", entry.path, exc)
        elif _is_image(entry):
            if path < start:
                continue
            if stop is not None and path >= stop:
                return
            yield "/".join(path)


def _parts(position: str | None) -> tuple[str, ...]:
    """A relative path as its tuple of components, the walk's order; None (the beginning) as ()."""
    return () if position is None else tuple(position.split("/"))


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda entry: entry.name)


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    """A folder that is not a symlink (symlinked folders could form loops)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_image(entry: os.DirEntry[str]) -> bool:
    """An image-named regular file, a symlink to one, or a dangling symlink.

    Dangling symlinks are kept so that they become error records rather than
    vanishing silently; FIFOs, sockets and devices are left out, and so are macOS
    AppleDouble files (``._name.jpg``, metadata that copies from a Mac leave behind).
    """
    if entry.name.startswith("._"):
        return False
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        if entry.is_file():
            return True
        return entry.is_symlink() and not os.path.exists(entry.path)
    except OSError:
        return False
