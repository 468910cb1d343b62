"""Checkpoint files that survive crashes: atomic writes and digest-checked reads.

- :func:`atomic_write`: ``path`` holds either its old content or all of the new bytes,
  whatever happens meanwhile (a temporary file in the same directory, flushed and
  fsynced, ``os.replace``d over ``path``, the directory fsynced);
- :func:`save_checkpoint` / :func:`load_checkpoint`: ``torch.save`` of any object behind
  a header with the payload's length and blake2b digest, so that a truncated, corrupt or
  foreign file raises a ``ValueError`` naming the path instead of loading garbage.

``KCDLoader.save`` / ``KCDLoader.load`` and the KD trainer's teacher cache write through
these functions. None of them is a collective: under DDP write on one rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import struct
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "atomic_write", "load_checkpoint", "save_checkpoint"]

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


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` holds either its old content or all of
    ``data``, whatever happens meanwhile: a temporary file in the same directory
    (``.<name>.<random>.tmp``, created with the umask's permissions) is written, flushed
    and fsynced, then renamed over ``path`` with ``os.replace``, and the directory is
    fsynced. On any error the temporary file is removed and the error propagates."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
