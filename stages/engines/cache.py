"""A content-keyed, crash- and race-safe folder of compiled models on disk.

Several jobs may start on a cold cache at once. Each builds into its own
temporary folder and renames it into place; a rename is atomic, so readers see
either no entry or a complete one, and the loser of a race discards its copy.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from wanwu.errors import EngineError

logger = logging.getLogger(__name__)


def cache_key(*parts: str) -> str:
    """A short stable folder name for ``parts`` (sha1 of them joined)."""
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()


def cached_file(root: Path, key: str, filename: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The path of ``root/key/filename``, building the entry first if it is absent.

    Args:
        root: the cache folder for one kind of artefact, e.g. ``cache/openvino``.
        key: the entry's name, from ``cache_key``.
        filename: the main file of the entry, whose presence marks it complete.
        build: writes the entry's files into the folder it is given (a temporary
            one); may write more than ``filename`` (e.g. OpenVINO's ``.bin``).

    Returns:
        ``(path, built)``: the file, and whether this call built it.

    Raises:
        EngineError: the cache folder cannot be written.
    """
    final = root / key
    path = final / filename
    if path.is_file():
        return path, False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        # mkdtemp makes a private (0700) folder; once renamed into place the
        # entry should be readable like any other cache folder.
        tmp.chmod(0o755)
    except OSError as exc:
        raise EngineError(f"expected a writable engine cache at {root}: {exc}") from exc
    try:
        build(tmp)
        if not (tmp / filename).is_file():
            raise EngineError(f"expected the cache builder to write {filename}, it did not")
        try:
            tmp.rename(final)
        except OSError as exc:
            # Another job renamed its copy into place first; use that one.
            if not path.is_file():
                raise EngineError(
                    f"expected to move a new cache entry to {final}, got {exc}; "
                    "delete that folder if it is a broken leftover"
                ) from exc
            logger.debug("cache entry %s appeared while building; using it", final)
            return path, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s", path)
    return path, True
