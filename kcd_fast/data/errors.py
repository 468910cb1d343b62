"""The one error for a sample that cannot be read, and the checks made before any back end
opens a user's file.

:class:`UnreadableSampleError` is what every back end (torch, DALI, the DALI folder
overlay) raises for a sample it cannot read: a missing file, a special file (a FIFO, a
socket, a device, a directory) under an image's name, a file without read permission, bytes
that do not decode. Its message names the file, the dataset index and the reason; the same
three are its attributes ``path``, ``index`` and ``reason`` (``index`` is None where a
reader outside a loader raised it, such as :func:`kcd_fast.data.load_rgb`). A missing file
raises the subclass :class:`MissingSampleError`, which is also a ``FileNotFoundError``.

Files are opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is read
(:func:`open_regular`, :func:`read_regular`): opening a FIFO for reading would otherwise block until a writer
appears, forever. The DALI back end, whose reader opens files itself, checks each path with
``stat`` just before it hands the batch to DALI (:func:`check_regular`).
"""

from __future__ import annotations

import os
import re
import stat
from typing import BinaryIO

__all__ = [
    "MissingSampleError",
    "UnreadableImageError",
    "UnreadableSampleError",
    "check_regular",
    "open_regular",
    "read_regular",
    "sample_error",
]


class UnreadableImageError(OSError):
    """An image file exists but cannot be read or decoded; the message names the file."""


_INDEX = re.compile(r"\(dataset index (\d+)")
_PATH = re.compile(r"file '((?:[^'\\]|\\.)*)'")


class UnreadableSampleError(UnreadableImageError):
    """A sample of a dataset cannot be read; the message names the file, the dataset index
    and the reason.

    Attributes:
        path: the file (None when the sample is not a file).
        index: the dataset index (None when raised outside a loader).
        reason: why it cannot be read (the decoder's or the operating system's words).

    A worker process's error re-raised by ``torch.utils.data.DataLoader`` keeps only the
    message; ``path`` and ``index`` are then read back from it.
    """

    def __init__(self, message: str, *, path: str | None = None, index: int | None = None, reason: str = ""):
        super().__init__(message)
        if index is None:
            m = _INDEX.search(message)
            index = int(m.group(1)) if m else None
        if path is None:
            m = _PATH.search(message)
            path = m.group(1) if m else None
        self.path, self.index, self.reason = path, index, reason or message

    def __reduce__(self) -> tuple:  # pickled whole (multiprocessing), attributes included
        return (_rebuild, (type(self), str(self), self.path, self.index, self.reason))


def _rebuild(cls: type, message: str, path: str | None, index: int | None, reason: str) -> UnreadableSampleError:
    return cls(message, path=path, index=index, reason=reason)


class MissingSampleError(UnreadableSampleError, FileNotFoundError):
    """A sample's file does not exist (an :class:`UnreadableSampleError` and a ``FileNotFoundError``)."""


def sample_error(
    path: str, reason: str, *, index: int | None = None, where: str = "", missing: bool = False
) -> UnreadableSampleError:
    """The error for sample ``index`` at ``path``: ``image file '<path>' <reason> (dataset
    index <index>, <where>)``; ``missing``: a :class:`MissingSampleError`."""
    ctx = ", ".join(x for x in (f"dataset index {index}" if index is not None else "", where) if x)
    msg = f"image file {path!r} {reason}" + (f" ({ctx})" if ctx else "")
    cls = MissingSampleError if missing else UnreadableSampleError
    return cls(msg, path=path, index=index, reason=reason)


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def _special(mode: int) -> str | None:
    """None for a regular file, else what the file is (``"a FIFO (named pipe)"``, ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str, *, index: int | None = None, where: str = "") -> None:
    """Raises :class:`UnreadableSampleError` unless ``path`` is a regular file this process
    may read (:class:`MissingSampleError` when it does not exist). One ``stat``, never an
    ``open``: it cannot block on a FIFO."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise sample_error(path, "is missing", index=index, where=where, missing=True) from None
    except OSError as err:
        raise sample_error(path, f"cannot be read: {err.strerror or err}", index=index, where=where) from err
    kind = _special(st.st_mode)
    if kind is not None:
        raise sample_error(path, f"is {kind}, not a regular file", index=index, where=where)
    if not os.access(path, os.R_OK):
        raise sample_error(path, "cannot be read: permission denied", index=index, where=where)


def open_regular(path: str, *, index: int | None = None, where: str = "") -> BinaryIO:
    """``path`` opened for reading (binary), checked to be a regular file;
    :class:`UnreadableSampleError` for anything else. The file is opened with ``O_NONBLOCK``
    (a FIFO opens at once instead of waiting for a writer) and checked with ``fstat``, so the
    check and the reads are of the same file (``O_NONBLOCK`` changes nothing for a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise sample_error(path, "is missing", index=index, where=where, missing=True) from None
    except OSError as err:
        raise sample_error(path, f"cannot be read: {err.strerror or err}", index=index, where=where) from err
    f = os.fdopen(fd, "rb")
    kind = _special(os.fstat(fd).st_mode)
    if kind is not None:
        f.close()
        raise sample_error(path, f"is {kind}, not a regular file", index=index, where=where)
    return f


def read_regular(path: str, *, index: int | None = None, where: str = "") -> bytes:
    """The bytes of ``path``, a regular file (:func:`open_regular`); :class:`UnreadableSampleError`
    for anything else."""
    with open_regular(path, index=index, where=where) as f:
        try:
            return f.read()
        except OSError as err:
            raise sample_error(path, f"cannot be read: {err.strerror or err}", index=index, where=where) from err
