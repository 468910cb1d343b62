"""Counting file opens with Linux inotify (``IN_OPEN``), to check that a loader reads exactly
the files it should: what the kernel saw, independent of any loader's own counters. Used by
the DALI tests and ``benchmarks/loader.py``; Linux only."""

from __future__ import annotations

import collections
import ctypes
import os
import struct

__all__ = ["FileOpens"]


class FileOpens:
    """Counts the opens of files in some folders with Linux inotify (``IN_OPEN``): what was
    really read, independent of the back end's own counters. (inotify merges identical
    events only when they are adjacent and unread, so a file opened twice in a row would
    count once; the back end's counter covers that case.)"""

    IN_OPEN, IN_ISDIR = 0x20, 0x40000000

    def __init__(self, dirs: list[str]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs: dict[int, str] = {}
        for d in dirs:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(d), self.IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch failed on {d}")
            self.dirs[wd] = d

    def drain(self) -> collections.Counter[str]:
        """Opens since the last drain, per file path."""
        count: collections.Counter[str] = collections.Counter()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return count
            off = 0
            while off < len(buf):
                wd, mask, _cookie, size = struct.unpack_from("iIII", buf, off)
                name = buf[off + 16 : off + 16 + size].rstrip(b"\0").decode()
                off += 16 + size
                if name and not mask & self.IN_ISDIR:
                    count[os.path.join(self.dirs[wd], name)] += 1

    def close(self) -> None:
        os.close(self.fd)
