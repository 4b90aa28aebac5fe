"""Reading whole files and naming them, shared by the folder and list-file sources."""

from __future__ import annotations

import logging
import mmap
import os
import stat

from wanwu.errors import ReadError

logger = logging.getLogger(__name__)

# O_NONBLOCK so that a FIFO or device named like an image cannot hang the loader
# in open(); it has no effect on regular files. O_CLOEXEC keeps the descriptor out
# of any child the loader might start.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def read_file(path: str, max_bytes: int | None = None) -> bytes:
    """The whole content of the regular file at ``path``, as a fresh ``bytes``.

    The file is mapped and copied out, then the map and descriptor are closed, so
    the caller holds no open resource.

    Raises:
        ReadError: the file is missing, vanished, unreadable, not a regular file,
            empty, or larger than ``max_bytes`` (then it is not read); the message
            names the path and the OS error.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ReadError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReadError(f"cannot read {path!r}: expected a regular file")
        if info.st_size == 0:
            raise ReadError(f"{path!r} is empty (0 bytes)")
        check_size(path, info.st_size, max_bytes)
        # A file truncated by another process while mapped raises SIGBUS on access;
        # the copy below is the only access and takes microseconds, which keeps
        # that window small.
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            return view[:]
    except ValueError as exc:
        # mmap refuses a length of 0: the file was truncated after fstat().
        raise ReadError(f"{path!r} is empty (0 bytes)") from exc
    except OSError as exc:
        raise ReadError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def check_size(name: str, size: int, max_bytes: int | None) -> None:
    """Raise ``ReadError`` when an input of ``size`` bytes is larger than ``max_bytes`` (None: no bound)."""
    if max_bytes is not None and size > max_bytes:
        raise ReadError(f"expected an image of at most {max_bytes:,} bytes (more than any image within the "
                        f"pixel limit needs), got {name!r} of {size:,} bytes; not read")


def key_text(name: str) -> str:
    """``name`` as a key that encodes to UTF-8.

    Names from the file system may hold undecodable bytes (as lone surrogates,
    Python's ``surrogateescape``); those cannot be written by the UTF-8 sinks, so
    they become backslash escapes (``\\xff``). Other names are returned unchanged.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name
