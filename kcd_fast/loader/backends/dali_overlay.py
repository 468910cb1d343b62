"""VAKS on image folders: the DALI back end's overlay of summarised images.

Files are never rewritten. When a condensation summarises pairs ``(dst, src, eps)``, the
summarised images are materialised once: for every pair, decode the current image of
``dst`` and of ``src`` (the overlay image when the point was summarised before, the file
otherwise; RGB, EXIF orientation applied; :mod:`.image_codec`: torchcodec's libjpeg-turbo
when installed, Pillow otherwise, the same pixels), resize the ``src`` image to ``dst``'s
size (``kcd_fast.ops.resize_bilinear``: Pillow's bilinear filter bit for bit, fixed-point,
deterministic, 2.4x faster than Pillow on benchmarks/scale.py), blend with ``kcd_fast.ops.blend_image_``
(the kernel of the array path's ``blend_``, on the pair's two buffers: round half up, all
pairs of one condensation reading the images from before it) and store the result at
``dst``'s own size, encoded as

- ``"jpeg"``: quality 95 with 4:2:0 chroma, like the photos it replaces (their chroma is
  already at half resolution). Lossy: on photo-like images the mean error is about 0.9 of
  a level and 99.9% of pixels lie within 4 levels of the blend; about 1.1-1.4x the source
  JPEG's bytes. Deterministic (libjpeg-turbo's integer DCT): a replay gives the same bytes.
- ``"pnm"``: binary PPM, raw pixels behind a short header: lossless, ~12x a photo's JPEG.
- ``"png"``: lossless, smaller than PPM, slower.

That runs on the ``num_threads`` CPU threads. With ``device`` (the DALI back end passes its
GPU when torchcodec is installed), the tensor summariser does the same on the device:
per chunk of pairs one batched decode (nvJPEG on CUDA), torch's antialiased bilinear resize
(within a level or two of Pillow's fixed point), the blend kernel, the encoder on the device.

Where the images live:

- In memory (``overlay_dir`` None), at most ``budget`` bytes: past it, further summarised
  images go to files in a private temporary directory the overlay owns and removes.
- With ``overlay_dir``: files in ``<overlay_dir>/kcd-overlay-<key>`` (``key``: a digest of
  the dataset's file list and the format). Files are content-addressed: summary ``k`` of
  the log has a chained digest ``d_k = H(d_{k-1}, dst, src, eps)`` and writes
  ``<d_k>-<dst>.<ext>`` for each pair, then a marker ``<d_k>.done``. A summary whose
  marker and files exist is reused, not recomputed: a process resumed after a crash or
  preemption reads what the previous one wrote (the digest says which summaries match),
  and anything else is rebuilt; the digest also covers the sizes of the original files a
  summary reads, and the marker the size of every file it wrote (a file cut short or an
  image replaced in place is not reused). Files are written atomically (a temporary name
  unique across hosts, flushed to disk, then renamed). Each overlay holds a lock on its
  entry in ``users/`` while it lives (the kernel releases it however the process ends); the
  last one to go removes the directory.
- Distributed (``torch.distributed`` ranks, see :meth:`FolderOverlay.set_distributed`):
  when every rank sees the same ``overlay_dir`` (a probe file each rank writes and all
  check), rank ``r`` materialises pairs ``r, r + world, ...`` of each summary and all
  ranks read the result after a collective (errors on any rank raise on all); otherwise
  (in memory, or node-local directories) every rank materialises every pair, as a single
  process does.

The overlay is a pure function of the ORIGINAL files and the summary log, so a resumed
loader rebuilds it bit-exactly from its log (:meth:`FolderOverlay.sync`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ...data.errors import (
    MissingSampleError,
    UnreadableImageError,
    UnreadableSampleError,
    check_regular,
    read_regular,
    sample_error,
)
from ...ops import blend_, blend_image_, blend_pairs_async_, resize_bilinear
from ..state import is_prefix
from .image_codec import (
    OverlayFormat,
    decode_rgb,
    decode_rgb_batch,
    encode,
    encode_chw,
    read_rgb,
    resize_chw,
    torchcodec_module,
)

__all__ = ["FolderOverlay", "OverlayFormat"]

_OVERLAY_CHUNK = 256  # pairs decoded at a time while materialising a summary (bounds memory)
_DEVICE_CHUNK = 32  # pairs per batched decode on a device (64 images in device memory at once)


def _device_arg(device: Any) -> torch.device:
    """``device`` (FolderOverlay) -> a torch.device the tensor summariser can run on, or raise."""
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError):
        raise ValueError(f"device must be None or a torch device (e.g. 'cuda:0'), got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; pass device=None")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu' or a CUDA device, got {device!r}")
    if torchcodec_module() is None:
        raise ValueError(
            f"device={device!r}: the tensor summariser decodes and encodes with torchcodec, which is not "
            "installed (pip install torchcodec) or is switched off (KCD_FAST_NO_TORCHCODEC); pass device=None "
            "to summarise on the CPU's threads"
        )
    return dev


def _entry_rgb(entry: np.ndarray | str) -> np.ndarray:
    """An overlay entry (encoded bytes, or the path of an overlay file) -> uint8 ``[H, W, 3]``."""
    if isinstance(entry, str):
        return decode_rgb(read_regular(entry))  # never blocks (a FIFO put in its place is refused)
    return decode_rgb(entry)


_WHY_READ = "read to summarise a condensation's VAKS pairs"


def _read_point(path: str, index: int) -> np.ndarray:
    """:func:`read_rgb` of dataset point ``index``; its errors say which point and why it was read."""
    try:
        return read_rgb(path)
    except UnreadableSampleError as err:
        raise sample_error(
            path, err.reason, index=index, where=_WHY_READ, missing=isinstance(err, MissingSampleError)
        ) from err
    except UnreadableImageError as err:
        raise sample_error(path, str(err), index=index, where=_WHY_READ) from err


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_error(err: OSError, path: str, place: str) -> OSError:
    """``err`` (writing ``path``) as an OSError of the same errno that names ``place`` (the
    option that chose the directory) and the file, and says the partial file is gone."""
    why = err.strerror or str(err)
    return OSError(
        err.errno,
        f"{place}: writing the overlay file {path!r} failed: {why} (the partial file was removed); "
        "free space there or pass another directory",
    )


def _remove_files(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


_HOST = socket.gethostname()


def _write_atomic(path: str, data: bytes, durable: bool = True, place: str = "dali_overlay_dir") -> None:
    """Writes ``path`` under a temporary name unique across hosts and processes, flushed to
    disk (``durable``), then renamed: readers never see a partial file, and a file a marker
    names survives a crash whole. A failed write (a full disk) removes the temporary file
    and raises an ``OSError`` of the same errno naming ``place`` and ``path``."""
    tmp = f"{path}.{_HOST}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        _remove_files([tmp])
        raise _write_error(err, path, place) from err


def _summary_tensors(s: Any, n: int) -> tuple[list[int], list[int], list[float], bytes]:
    """One summary log entry -> (dst, src, eps lists, the bytes its digest covers); raises
    ``ValueError`` / ``IndexError`` for a malformed entry."""
    try:
        dst = torch.as_tensor(s["dst"]).cpu()
        src = torch.as_tensor(s["src"]).cpu()
        eps = torch.as_tensor(s["eps"]).cpu()
    except (KeyError, TypeError) as err:
        got = sorted(s) if isinstance(s, dict) else s
        raise ValueError(f"a summary must hold dst / src / eps, got {got!r}") from err
    ok = (
        dst.dtype == src.dtype == torch.int64
        and eps.is_floating_point()
        and dst.dim() == 1
        and dst.shape == src.shape == eps.shape
    )
    if not ok:
        raise ValueError(
            f"a summary needs int64 [P] dst / src and float [P] eps, got dst {dst.dtype} "
            f"{tuple(dst.shape)}, src {src.dtype} {tuple(src.shape)}, "
            f"eps {eps.dtype} {tuple(eps.shape)}"
        )
    if dst.numel() and (min(int(dst.min()), int(src.min())) < 0 or max(int(dst.max()), int(src.max())) >= n):
        raise IndexError(f"summary indices must lie in [0, {n})")
    eps64 = eps.to(torch.float64)
    d_l, s_l = dst.tolist(), src.tolist()
    if len(set(d_l)) != len(d_l) or set(d_l) & set(s_l):
        seen: set[int] = set()
        twice = sorted({i for i in d_l if i in seen or seen.add(i)} | (set(d_l) & set(s_l)))
        raise ValueError(
            f"summary dst must be unique and disjoint from src (as kcd_fast.condense makes them); point(s) "
            f"{twice[:5]} appear twice in dst or in both"
        )
    raw = dst.numpy().tobytes() + src.numpy().tobytes() + eps64.numpy().tobytes()
    return d_l, s_l, eps64.tolist(), raw


class _Users:
    """The processes using an overlay directory. Each holds a shared ``flock`` on its own file
    in ``<dir>/users`` for as long as it lives (the kernel drops it when the process dies,
    however it dies), made under a temporary name and renamed in already locked. Leaving
    takes ``<dir>/.lock`` exclusively, drops entries nobody holds, and when none is held
    renames the directory to a tombstone before removing it; joining takes the same lock
    shared, so nobody joins a directory that is being removed."""

    def __init__(self, directory: str):
        import fcntl

        self.dir = directory
        while True:
            os.makedirs(os.path.join(directory, "users"), exist_ok=True)
            lock = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(lock, fcntl.LOCK_SH)
            try:
                if os.fstat(lock).st_ino == os.stat(os.path.join(directory, ".lock")).st_ino:
                    name = f"{_HOST}@{os.getpid()}@{os.urandom(6).hex()}"
                    tmp = os.path.join(directory, "users", f".{name}.tmp")
                    self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
                    fcntl.flock(self._fd, fcntl.LOCK_SH)
                    self.me = os.path.join(directory, "users", name)
                    os.replace(tmp, self.me)
                    return
            except FileNotFoundError:
                pass  # the directory was removed while we looked: make it again
            finally:
                os.close(lock)

    def leave(self) -> None:
        import fcntl

        try:
            os.remove(self.me)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        try:
            lock = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            users = os.path.join(self.dir, "users")
            for name in os.listdir(users):
                path = os.path.join(users, name)
                try:
                    fd = os.open(path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # a live user: the directory stays
                finally:
                    os.close(fd)
                _remove_files([path])  # nobody holds it: its process is gone
            tomb = f"{self.dir}.removing-{os.urandom(4).hex()}"
            os.rename(self.dir, tomb)
        except FileNotFoundError:
            return
        finally:
            os.close(lock)
        shutil.rmtree(tomb, ignore_errors=True)


class FolderOverlay:
    """The summarised images of an image folder, keyed by dataset index.

    Args:
        paths: ``[N]`` the ORIGINAL image files, in dataset order.
        overlay_format: ``"pnm"``, ``"png"`` or ``"jpeg"`` (:class:`OverlayFormat`).
        num_threads: threads that decode, blend and encode the pairs of a summary.
        overlay_dir: None (in memory) or a directory (made if missing) that holds the
            overlay's directory of content-addressed files (reused on resume, split
            between ranks when they share it; see the module docstring).
        budget: bytes the overlay may hold in memory (``overlay_dir`` None); past it, new
            entries are written to files in a private temporary directory the overlay owns.
        device: None (default): pairs summarised on the CPU's threads, Pillow's pixels bit for
            bit; or a torch device (the DALI back end passes its GPU): the batched tensor
            summariser on that device, which needs torchcodec (nvJPEG decoding and encoding
            on CUDA) and resizes with torch's antialiased bilinear filter (within a level of
            Pillow's). Its files get their own ``overlay_dir`` entry (other pixels).
    """

    def __init__(
        self,
        paths: list[str],
        *,
        overlay_format: str | OverlayFormat = "pnm",
        num_threads: int = 1,
        overlay_dir: str | os.PathLike | None = None,
        budget: int = 1 << 30,
        device: str | torch.device | None = None,
    ):
        try:
            fmt = OverlayFormat(overlay_format.value if isinstance(overlay_format, OverlayFormat) else overlay_format)
        except ValueError:
            raise ValueError(
                "overlay_format (KCDLoader: dali_overlay_format) must be 'pnm', 'png' or 'jpeg', "
                f"got {overlay_format!r}"
            ) from None
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget (KCDLoader: dali_overlay_budget) must be an int >= 0 (bytes), got {budget!r}")
        if overlay_dir is not None and not isinstance(overlay_dir, (str, os.PathLike)):
            raise TypeError(
                f"overlay_dir (KCDLoader: dali_overlay_dir) must be a directory path or None, got "
                f"{type(overlay_dir).__name__}"
            )
        self.device = None if device is None else _device_arg(device)
        self._paths = paths
        self.n = len(paths)
        self.format = fmt
        self.num_threads = int(num_threads)
        # index -> encoded bytes (in memory) or the path of an overlay file
        self._overlay: dict[int, np.ndarray | str] = {}
        self._applied: list[dict[str, Any]] = []
        self._digests: list[str] = []  # the chained digest of each applied summary (files mode)
        self._dir: str | None = None
        self._files_made = 0  # names spilled files uniquely
        self.budget = int(budget)
        self._spilled = False  # past the memory budget: new entries go to files
        self._dist: Any = None  # kcd_fast.distributed.DistInfo, or None: a single process
        self._shared: bool | None = None  # ranks share the directory (probed once)
        # counters: pairs this process materialised / summaries it reused from files
        self.stats = {"pairs_made": 0, "summaries_made": 0, "summaries_reused": 0}
        self._files = overlay_dir is not None  # content-addressed files in a shared directory
        if self._files:
            key = hashlib.blake2b(digest_size=10)
            key.update(f"kcd-overlay-1\0{fmt.value}\0{self.n}\0".encode())
            if self.device is not None:  # the tensor summariser's pixels differ from Pillow's
                key.update(f"tensor:{self.device.type}\0".encode())
            for p in paths:
                key.update(os.fsencode(p) + b"\0")
            self._key = key.hexdigest()
            self._dir = os.path.join(os.fspath(overlay_dir), f"kcd-overlay-{self._key}")
            self._place = f"dali_overlay_dir {os.fspath(overlay_dir)!r}"
            self._join()

    def _join(self) -> None:
        """Makes the overlay's directory (again, after it was deleted) and registers as its user."""
        try:
            os.makedirs(self._dir, exist_ok=True)
            users = _Users(self._dir)
        except OSError as err:
            raise OSError(
                f"overlay_dir (KCDLoader: dali_overlay_dir) {os.path.dirname(self._dir)!r} cannot hold the overlay's "
                f"files ({type(err).__name__}: {err}); pass a writable directory, or None to keep the overlay "
                "in memory"
            ) from err
        weakref.finalize(self, users.leave)

    def _lost(self) -> bool:
        """The overlay's files are gone: its directory was deleted (or, with ``overlay_dir``, the
        marker of a summary it applied)."""
        if self._dir is None or not any(isinstance(v, str) for v in self._overlay.values()) and not self._files:
            return False
        if not os.path.isdir(self._dir):
            return True
        return self._files and not all(os.path.exists(os.path.join(self._dir, f"{d}.done")) for d in self._digests)

    def _recover(self) -> None:
        """After :meth:`_lost`: the directory is made again and the overlay rebuilt from the
        summaries applied so far. In memory (a deleted spill directory) the overlay is emptied
        and the sync that follows rebuilds it from the log; with ``overlay_dir`` this process
        rewrites the files of every applied summary whose marker is gone, alone (no collective:
        under DDP another rank may not have noticed), reusing the summaries whose files survive."""
        warnings.warn(
            f"the overlay directory {self._dir!r} (or files in it) was deleted while the loader used it: "
            f"it is made again and the overlay rebuilt from the summary log ({len(self._applied)} summaries)",
            UserWarning,
            stacklevel=4,
        )
        if not self._files:
            self._dir, self._spilled = None, False  # a new spill directory when the budget is passed again
            self._overlay, self._applied, self._digests = {}, [], []
            return
        self._join()
        overlay: dict[int, Any] = {}
        for s, digest in zip(self._applied, self._digests, strict=True):
            d_l, s_l, e_l, _ = _summary_tensors(s, self.n)
            names = [os.path.join(self._dir, f"{digest}-{i}.{self.format.extension}") for i in d_l]
            marker = os.path.join(self._dir, f"{digest}.done")
            if not self._reusable(marker, names):
                self._materialise(
                    overlay,
                    (d_l, s_l, e_l),
                    range(len(d_l)),
                    lambda j, data, names=names: _write_atomic(names[j], data.tobytes(), place=self._place),
                )
                sizes = {os.path.basename(n): os.path.getsize(n) for n in names}
                record = {"digest": digest, "pairs": len(d_l), "sizes": sizes}
                _write_atomic(marker, json.dumps(record).encode(), place=self._place)
            overlay = {**overlay, **dict(zip(d_l, names, strict=True))}
        self._overlay = overlay

    def set_distributed(self, info: Any) -> None:
        """``info``: a :class:`kcd_fast.distributed.DistInfo`; with more than one rank and a
        shared ``overlay_dir``, each summary is split between the ranks (collective: every
        rank must then call :meth:`sync` with the same log at the same point)."""
        self._dist = info
        self._shared = None

    def _make_spill_dir(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="kcd-overlay-", dir=tempfile.gettempdir())
        weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)

    @property
    def entries(self) -> dict[int, np.ndarray | str]:
        """index -> encoded bytes, or the path of its overlay file."""
        return self._overlay

    # -- sync ------------------------------------------------------------------------------
    def sync(self, summaries: list[dict[str, Any]]) -> None:
        """Brings the overlay in line with the summary log ``summaries``: applies the
        entries not applied yet, or starts again from the ORIGINAL files when the log is
        not an extension of what was applied (a resume, a new run; with ``overlay_dir``,
        summaries whose files exist are reused). Each entry is ``{"epoch": int, "dst":
        int64 [P], "src": int64 [P], "eps": float64 [P]}``. A file that cannot be read
        raises naming it; the overlay is then left unchanged. Distributed with a shared
        directory: collective."""
        if not isinstance(summaries, (list, tuple)):
            raise TypeError(f"summaries must be a list of dicts, got {type(summaries).__name__}")
        if self._lost():
            self._recover()
        k = len(self._applied)
        if is_prefix(self._applied, summaries):
            overlay, applied, digests = self._overlay, list(self._applied), list(self._digests)
            todo = list(summaries[k:])
        else:
            overlay, applied, digests, todo = {}, [], [], list(summaries)
        if not todo and overlay is self._overlay:
            return
        parsed = [_summary_tensors(s, self.n) for s in todo]  # malformed entries raise before any work
        created: list[str] = []  # spilled files written by this sync (memory mode)
        try:
            for s, p in zip(todo, parsed, strict=True):
                if self._files:
                    prev = digests[-1] if digests else self._key
                    h = hashlib.blake2b(prev.encode() + p[3], digest_size=10)
                    h.update(self._source_sizes(overlay, p[0] + p[1]))
                    digests.append(h.hexdigest())
                    overlay = self._apply_files(overlay, p, digests[-1])
                else:
                    overlay = self._apply_memory(overlay, p, created)
                applied.append(s)
        except BaseException:
            _remove_files(created)  # the committed overlay stays as it was
            raise
        if not self._files:  # spilled files no longer in the overlay go now
            kept = {v for v in overlay.values() if isinstance(v, str)}
            _remove_files(
                [v for v in self._overlay.values() if isinstance(v, str) and v not in kept]
                + [f for f in created if f not in kept]
            )
        self._overlay, self._applied, self._digests = overlay, applied, digests

    def _materialise(
        self, overlay: dict[int, Any], pairs: tuple[list[int], list[int], list[float]], js: Sequence[int], out: Any
    ) -> None:
        """Decodes, blends and encodes pairs ``js`` on the thread pool, reading the images
        of ``overlay`` (the state before the summary); ``out(j, encoded)`` stores pair j.
        dst and src are disjoint and dst unique, so no pair reads an image another pair
        writes: chunked work equals reading everything before writing anything."""
        d_l, s_l, e_l = pairs
        for j in js:  # the original files read are regular files (reading a FIFO would block forever)
            for i in (d_l[j], s_l[j]):
                if i not in overlay:
                    check_regular(self._paths[i], index=i, where=_WHY_READ)
        if self.device is not None:
            self._materialise_tensors(overlay, pairs, js, out)
            return

        def current(i: int) -> np.ndarray:  # the image of point i before this summary: [H, W, 3], ours to write
            return _entry_rgb(overlay[i]) if i in overlay else _read_point(self._paths[i], i)

        def blend_pair(j: int) -> np.ndarray:
            d, s = current(d_l[j]), current(s_l[j])
            h, w = d.shape[:2]
            # Pillow's bilinear resize, bit for bit (kcd/resize.h), without a PIL round trip
            blend_image_(d, s if s.shape == d.shape else resize_bilinear(s, (h, w)), e_l[j])
            return encode(d, self.format)

        js = list(js)
        with ThreadPoolExecutor(max_workers=max(1, self.num_threads)) as pool:
            for c in range(0, len(js), _OVERLAY_CHUNK):
                chunk = js[c : c + _OVERLAY_CHUNK]
                for j, enc in zip(chunk, pool.map(blend_pair, chunk), strict=True):
                    out(j, enc)
        self.stats["pairs_made"] += len(js)

    def _materialise_tensors(
        self, overlay: dict[int, Any], pairs: tuple[list[int], list[int], list[float]], js: Sequence[int], out: Any
    ) -> None:
        """:meth:`_materialise` on ``self.device``: per chunk, the files and entries read on the
        thread pool, all images decoded in one torchcodec call, each ``src`` resized to its
        ``dst`` (:func:`resize_chw`), the chunk's pairs blended by one launch of the blend kernel
        per image shape, with no host sync between launches (:func:`kcd_fast.ops.blend_pairs_async_`,
        the bounds guard's count read once per chunk; on the CPU :func:`kcd_fast.ops.blend_`), then
        each encoded (:func:`encode_chw`)."""
        d_l, s_l, e_l = pairs
        dev = self.device

        def raw(i: int) -> bytes:  # point i's bytes before this summary (b"": its file cannot be read)
            entry = overlay.get(i)
            if entry is not None and not isinstance(entry, str):
                return entry.tobytes()
            try:
                with open(self._paths[i] if entry is None else entry, "rb") as f:
                    return f.read()
            except OSError:
                if entry is not None:
                    raise
                return b""  # _read_point raises naming the file and the point

        js = list(js)
        with ThreadPoolExecutor(max_workers=max(1, self.num_threads)) as pool:
            for c in range(0, len(js), _DEVICE_CHUNK):
                chunk = js[c : c + _DEVICE_CHUNK]
                pts = [d_l[j] for j in chunk] + [s_l[j] for j in chunk]
                datas = list(pool.map(raw, pts))

                def fallback(k: int, pts: list[int] = pts, datas: list[bytes] = datas) -> np.ndarray:
                    i = pts[k]
                    return _read_point(self._paths[i], i) if i not in overlay else decode_rgb(datas[k])

                imgs = decode_rgb_batch(datas, fallback, dev)
                m = len(chunk)
                by_shape: dict[tuple[int, ...], list[int]] = {}  # pairs of one dst shape: one blend launch
                for k in range(m):
                    by_shape.setdefault(tuple(imgs[k].shape), []).append(k)
                # the weights in group order: one copy to the device per chunk, a slice per group
                eps = torch.tensor([e_l[chunk[k]] for ks in by_shape.values() for k in ks], dtype=torch.float64)
                eps = eps.to(dev)
                on_gpu = torch.device(dev).type == "cuda"
                skipped = torch.zeros(1, dtype=torch.int64, device=dev) if on_gpu else None
                blended: list[torch.Tensor | None] = [None] * m
                off = 0
                for (_, h, w), ks in by_shape.items():
                    g = len(ks)
                    # [2g, 3, H, W]: the dst images, then each src resized to its dst
                    stack = torch.stack([imgs[k] for k in ks] + [resize_chw(imgs[m + k], (h, w)) for k in ks])
                    dst = torch.arange(g, device=dev)
                    src, e = dst + g, eps[off : off + g]
                    off += g
                    if on_gpu:  # queued: no host sync per pair or per group
                        blend_pairs_async_(stack, dst, src, e, skipped)
                    else:
                        blend_(stack, dst, src, e)
                    for i, k in enumerate(ks):
                        blended[k] = stack[i]
                if on_gpu and int(skipped.item()):  # one sync per chunk (condense's pairs: never taken)
                    raise IndexError(f"{int(skipped.item())} summary pair(s) had a weight outside [0, 1]")
                for j, img in zip(chunk, blended, strict=True):
                    out(j, encode_chw(img, self.format))
        self.stats["pairs_made"] += len(js)

    def _apply_memory(self, overlay: dict[int, Any], p: tuple, created: list[str]) -> dict[int, Any]:
        """A new overlay with one summary applied in memory (``overlay`` is not modified;
        spilled files it writes are appended to ``created``)."""
        d_l = p[0]
        in_memory = sum(int(v.nbytes) for v in overlay.values() if not isinstance(v, str))
        pending: dict[int, np.ndarray | str] = {}

        def store(j: int, data: np.ndarray) -> None:
            nonlocal in_memory
            i = d_l[j]
            if self._dir is None and in_memory + data.nbytes <= self.budget:
                in_memory += data.nbytes
                pending[i] = data
                return
            if self._dir is None:  # past the budget: this and later entries go to files
                self._make_spill_dir()
                self._spilled = True
            self._files_made += 1
            path = os.path.join(self._dir, f"{i}-{self._files_made}.{self.format.extension}")
            place = f"the overlay's spill directory {self._dir!r} (past dali_overlay_budget={self.budget})"
            _write_atomic(path, data.tobytes(), durable=False, place=place)
            created.append(path)
            pending[i] = path

        self._materialise(overlay, p[:3], range(len(d_l)), store)
        self.stats["summaries_made"] += 1
        return {**overlay, **pending}

    # -- files mode (overlay_dir): content-addressed, reused, split between ranks ------------
    def _communicates(self) -> bool:
        return self._dist is not None and self._dist.communicates

    def _all_ok(self, ok: bool) -> bool:
        from ... import distributed as D

        return D.all_ok(ok, self._dist.group) if self._communicates() else ok

    def _source_sizes(self, overlay: dict[int, Any], points: list[int]) -> bytes:
        """The sizes of the ORIGINAL files a summary reads (points not summarised before it;
        -1 for a missing file) for its digest: an image replaced in place by one of another
        size changes the digest, so its old blends are not reused."""
        sizes = []
        for i in points:
            if i in overlay:
                continue
            try:
                sizes.append(os.path.getsize(self._paths[i]))
            except OSError:
                sizes.append(-1)
        return np.asarray(sizes, dtype=np.int64).tobytes()

    def _probe_shared(self) -> bool:
        """Collective: True when every rank sees the files every rank writes in the directory
        (a rank that cannot write its probe makes it False on every rank)."""
        from ... import distributed as D

        info = self._dist
        nonce = D.broadcast_int(int.from_bytes(os.urandom(7), "little"), info.rank, info.group)
        probe = os.path.join(self._dir, f"probe-{nonce:x}-{{}}")
        try:
            _write_atomic(probe.format(info.rank), b"", durable=False)
            wrote = True
        except OSError:
            wrote = False
        try:
            D.all_ok(True, info.group)  # every rank has written (or failed to write) its probe
            seen = wrote and all(os.path.exists(probe.format(r)) for r in range(info.world_size))
            return D.all_ok(seen, info.group)  # every rank has looked
        finally:
            _remove_files([probe.format(info.rank)])

    def _reusable(self, marker: str, names: list[str]) -> bool:
        """The marker exists and names exactly these files at the sizes they have now (a file
        cut short or replaced since is not reused)."""
        try:
            with open(marker, "rb") as f:
                sizes = json.loads(f.read())["sizes"]
            return len(sizes) == len(names) and all(os.path.getsize(n) == sizes[os.path.basename(n)] for n in names)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _apply_files(self, overlay: dict[int, Any], p: tuple, digest: str) -> dict[int, Any]:
        d_l = p[0]
        ext = self.format.extension
        names = [os.path.join(self._dir, f"{digest}-{i}.{ext}") for i in d_l]
        marker = os.path.join(self._dir, f"{digest}.done")
        if self._all_ok(self._reusable(marker, names)):  # every rank has the files: reuse them
            self.stats["summaries_reused"] += 1
            return {**overlay, **dict(zip(d_l, names, strict=True))}
        split = False
        if self._communicates():
            if self._shared is None:
                self._shared = self._probe_shared()
            split = self._shared
        rank, world = (self._dist.rank, self._dist.world_size) if split else (0, 1)
        error: BaseException | None = None
        try:
            os.makedirs(self._dir, exist_ok=True)
            self._materialise(
                overlay,
                p[:3],
                range(rank, len(d_l), world),
                lambda j, data: _write_atomic(names[j], data.tobytes(), place=self._place),
            )
        except Exception as err:  # reported on every rank below
            error = err
        if not self._all_ok(error is None):
            if error is not None:
                raise error
            raise RuntimeError("another rank failed to materialise its share of a summary; see its error")
        if rank == 0:  # every file of the summary is written (and flushed): the marker lists them
            try:
                sizes = {os.path.basename(n): os.path.getsize(n) for n in names}
                _write_atomic(
                    marker,
                    json.dumps({"digest": digest, "pairs": len(d_l), "sizes": sizes}).encode(),
                    place=self._place,
                )
            except OSError as err:
                error = err
        if not self._all_ok(error is None):  # nobody goes on without the marker
            if error is not None:
                raise error
            raise RuntimeError("rank 0 failed to write a summary's marker; see its error")
        self.stats["summaries_made"] += 1
        return {**overlay, **dict(zip(d_l, names, strict=True))}

    # -- reading -----------------------------------------------------------------------------
    def image(self, index: int) -> np.ndarray | None:
        """The summarised image of point ``index`` (uint8 ``[H, W, 3]``), or None when the
        point reads its original file."""
        data = self._overlay.get(int(index))
        return None if data is None else _entry_rgb(data)

    @property
    def points(self) -> list[int]:
        """Sorted indices of the points whose overlay image replaces their file."""
        return sorted(self._overlay)

    @property
    def nbytes(self) -> int:
        """Bytes of the current overlay images (in memory, or in their files)."""
        return sum(os.path.getsize(v) if isinstance(v, str) else int(v.nbytes) for v in self._overlay.values())

    @property
    def directory(self) -> str | None:
        """The directory of the overlay files (``overlay_dir`` given, or made when the
        memory budget ran out), else None."""
        return self._dir

    @property
    def memory_bytes(self) -> int:
        """Bytes of encoded images held in memory (at most ``budget``: entries that would
        pass it go to files)."""
        return sum(int(v.nbytes) for v in self._overlay.values() if not isinstance(v, str))

    @property
    def shared(self) -> bool | None:
        """Files mode under torch.distributed: whether the ranks share the directory (and
        split each summary); None until probed (or when not distributed)."""
        return self._shared
