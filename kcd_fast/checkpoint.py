"""Checkpoint files that survive crashes: atomic writes and digest-checked reads.

- :func:`atomic_write`: ``path`` holds either its old content or all of the new bytes,
  whatever happens meanwhile (a temporary file in the same directory, flushed and
  fsynced, ``os.replace``d over ``path``, the directory fsynced);
- :func:`save_checkpoint` / :func:`load_checkpoint`: ``torch.save`` of any object behind
  a header with the payload's length and blake2b digest, so that a truncated, corrupt or
  foreign file raises a ``ValueError`` naming the path instead of loading garbage;
- :func:`remove_stale_temporaries`: the temporary files that killed writers left beside a
  target (``.<name>.<12 hex digits>.tmp``, each as large as the checkpoint), removed by
  every :func:`atomic_write` to that target. A writer holds an exclusive ``flock`` on its
  temporary file while it lives, so only files that no live process holds are removed
  (where ``fcntl`` is missing, Windows, nothing is removed).

``KCDLoader.save`` / ``KCDLoader.load`` and the KD trainer's teacher cache write through
these functions. None of them is a collective: under DDP write on one rank (``KCDLoader.save``
itself is a collective: every rank calls it, rank 0 writes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import struct
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock, no clean-up of stale temporary files
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_FORMAT", "atomic_write", "load_checkpoint", "remove_stale_temporaries", "save_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kcd_fast.checkpoint/1"
# File layout: magic (8 bytes) | payload length (uint64, little endian) | blake2b-256 of the
# payload (32 bytes) | payload (the bytes of torch.save(obj)).
_MAGIC = b"KCDCKPT1"
_HEADER = struct.Struct("<8sQ32s")


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_pattern(path: str) -> re.Pattern[str]:
    """The names :func:`atomic_write` gives its temporary files for ``path`` (and no other)."""
    return re.compile(r"\." + re.escape(os.path.basename(path)) + r"\.[0-9a-f]{12}\.tmp")


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Removes the temporary files that earlier, killed :func:`atomic_write` calls to
    ``path`` left in its directory: names ``.<basename>.<12 hex digits>.tmp`` only, and only
    those no live writer holds (each writer keeps an exclusive ``flock`` on its file until
    it is renamed or removed; a file whose lock is taken here is not anyone's any more).
    Returns the names removed. Never raises for a file that vanished or cannot be locked
    (another process's, a file system without locks); a no-op without ``fcntl``."""
    if fcntl is None:
        return []
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = _temporary_pattern(path)
    try:
        names = sorted(n for n in os.listdir(directory) if pattern.fullmatch(n))
    except OSError:
        return []
    removed = []
    for name in names:
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY)
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
            if os.path.samestat(os.fstat(fd), os.stat(full)):
                os.unlink(full)
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale temporary file(s) of %r left by killed writers: %s", len(removed), path, removed)
    return removed


def _create_temporary(path: str) -> tuple[str, int]:
    """A new temporary file beside ``path`` (``.<name>.<random>.tmp``), open for writing and
    locked (``flock``) so that :func:`remove_stale_temporaries` leaves it alone. A cleaner in
    another process may take the file between its creation and the lock: then it is made
    again under a new name."""
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        if fcntl is None:
            return tmp, fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return tmp, fd
        except FileNotFoundError:  # a cleaner removed it before the lock
            pass
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` holds either its old content or all of
    ``data``, whatever happens meanwhile: a temporary file in the same directory
    (``.<name>.<random>.tmp``, created with the umask's permissions and ``flock``-ed while
    it is written) is written, flushed and fsynced, then renamed over ``path`` with
    ``os.replace``, and the directory is fsynced. On any error the temporary file is
    removed and the error propagates. Temporary files of ``path`` that killed writers left
    behind are removed first (:func:`remove_stale_temporaries`)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    tmp, fd = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still locked: closing the file releases the lock
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` into ``path`` atomically (:func:`atomic_write`), behind a header
    with the payload's length and blake2b digest so that :func:`load_checkpoint` detects
    truncation and corruption. Not a collective: under DDP call it on one rank (or use
    ``KCDLoader.save``, which does)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(_MAGIC, len(payload), hashlib.blake2b(payload, digest_size=32).digest())
    atomic_write(path, header + payload)


def load_checkpoint(path: str | os.PathLike[str], *, weights_only: bool = True, map_location: Any = "cpu") -> Any:
    """Reads a :func:`save_checkpoint` file. Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` naming the path for a file that is not a kcd_fast checkpoint,
    is truncated, or whose content does not match its digest."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size or not data.startswith(_MAGIC):
        what = (
            "is truncated"
            if _MAGIC.startswith(data[: len(_MAGIC)]) and len(data) < _HEADER.size
            else "is not a kcd_fast checkpoint (bad magic bytes)"
        )
        raise ValueError(f"checkpoint {path!r} {what} ({len(data)} bytes)")
    _, length, digest = _HEADER.unpack_from(data)
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise ValueError(
            f"checkpoint {path!r} is truncated or was extended: its header announces {length} "
            f"payload bytes, the file holds {len(payload)}"
        )
    if hashlib.blake2b(payload, digest_size=32).digest() != digest:
        raise ValueError(f"checkpoint {path!r} is corrupt: its content does not match its blake2b digest")
    try:
        return torch.load(io.BytesIO(payload), weights_only=weights_only, map_location=map_location)
    except Exception as err:  # any unpickling failure means a bad file
        raise ValueError(f"checkpoint {path!r} could not be read by torch.load: {err}") from err
