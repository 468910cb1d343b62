"""VAKS on image folders: the DALI back end's overlay of summarised images.

Files are never rewritten. When a condensation summarises pairs ``(dst, src, eps)``, the
summarised images are materialised once: for every pair, decode the current image of
``dst`` and of ``src`` (the overlay image when the point was summarised before, the file
otherwise; PIL, EXIF orientation applied, RGB), resize the ``src`` image to ``dst``'s
size (PIL bilinear, fixed-point, deterministic), blend with ``kcd_fast.ops.blend_`` (the
kernel the array path uses: round half up, all pairs of one condensation reading the
images from before it) and store the result at ``dst``'s own size, encoded as
``"jpeg"`` (quality 95, no chroma subsampling: about the size of the photo it replaces; lossy,
each pixel within a few levels of the blend, deterministic, so a replay gives the same bytes),
``"pnm"`` (binary PPM, raw pixels behind a short header: lossless, ~7x a photo's JPEG) or
``"png"`` (lossless, smaller than PPM, slower), in memory or, with ``overlay_dir``, as files in
a private directory made inside it (removed with the overlay). In memory the overlay holds at
most ``budget`` bytes: past it, further summarised images go to files in a private temporary
directory that the overlay owns and removes.

The overlay is a pure function of the ORIGINAL files and the summary log, so a resumed
loader rebuilds it bit-exactly from its log (:meth:`FolderOverlay.sync`). Its memory is
about ``H * W * 3`` bytes per summarised point with ``"pnm"``, about a JPEG's with ``"jpeg"``.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from enum import Enum, unique
from typing import Any

import numpy as np
import torch

from ...data.folders import load_rgb
from ...ops import blend_
from ..state import is_prefix

__all__ = ["FolderOverlay", "OverlayFormat"]

_OVERLAY_CHUNK = 256  # pairs decoded at a time while materialising a summary (bounds memory)


@unique
class OverlayFormat(str, Enum):
    """How summarised folder images are encoded (pnm, png lossless; jpeg lossy)."""

    PNM = "pnm"  # binary PPM: raw RGB behind a short header; decoding is a copy
    PNG = "png"  # deflate-compressed, level 1
    JPEG = "jpeg"  # quality 95, 4:4:4: lossy, about the size of the photo it replaces


def _encode(img: np.ndarray, fmt: OverlayFormat) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> the encoded bytes ``[nbytes]`` uint8 (lossless)."""
    h, w = img.shape[:2]
    if fmt is OverlayFormat.PNM:
        return np.frombuffer(f"P6\n{w} {h}\n255\n".encode() + np.ascontiguousarray(img).tobytes(), np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    if fmt is OverlayFormat.JPEG:
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), np.uint8)


def _decode(data: np.ndarray) -> np.ndarray:
    """Overlay bytes -> uint8 ``[H, W, 3]``."""
    from PIL import Image

    with Image.open(io.BytesIO(data.tobytes())) as im:
        return np.asarray(im.convert("RGB"))


def _decode_entry(entry: np.ndarray | str) -> np.ndarray:
    """An overlay entry (encoded bytes, or the path of an overlay file) -> uint8 ``[H, W, 3]``."""
    if isinstance(entry, str):
        with open(entry, "rb") as f:
            return _decode(np.frombuffer(f.read(), np.uint8))
    return _decode(entry)


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 ``[h, w, 3]`` -> ``[H, W, 3]`` with PIL's bilinear filter (fixed-point, so the
    same bytes on every run: the overlay replays bit-exactly)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img, "RGB").resize((hw[1], hw[0]), Image.Resampling.BILINEAR))


class FolderOverlay:
    """The summarised images of an image folder, keyed by dataset index.

    Args:
        paths: ``[N]`` the ORIGINAL image files, in dataset order.
        overlay_format: ``"pnm"``, ``"png"`` or ``"jpeg"`` (:class:`OverlayFormat`).
        num_threads: threads that decode, blend and encode the pairs of a summary.
        overlay_dir: None (in memory) or a directory (made if missing) in which the
            overlay makes its private directory of overlay files.
        budget: bytes the overlay may hold in memory (``overlay_dir`` None); past it, new
            entries are written to files in a private temporary directory the overlay owns.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        overlay_format: str | OverlayFormat = "pnm",
        num_threads: int = 1,
        overlay_dir: str | os.PathLike | None = None,
        budget: int = 1 << 30,
    ):
        try:
            fmt = OverlayFormat(overlay_format.value if isinstance(overlay_format, OverlayFormat) else overlay_format)
        except ValueError:
            raise ValueError(f"overlay_format must be 'pnm', 'png' or 'jpeg', got {overlay_format!r}") from None
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget must be an int >= 0 (bytes), got {budget!r}")
        if overlay_dir is not None and not isinstance(overlay_dir, (str, os.PathLike)):
            raise TypeError(f"overlay_dir must be a directory path or None, got {type(overlay_dir).__name__}")
        self._paths = paths
        self.n = len(paths)
        self.format = fmt
        self.num_threads = int(num_threads)
        # index -> encoded bytes (in memory) or the path of an overlay file (overlay_dir)
        self._overlay: dict[int, np.ndarray | str] = {}
        self._applied: list[dict[str, Any]] = []
        self._dir: str | None = None
        self._files_made = 0  # names overlay files uniquely
        self.budget = int(budget)
        self._spilled = False  # past the memory budget: new entries go to files
        if overlay_dir is not None:
            self._make_dir(os.fspath(overlay_dir))

    def _make_dir(self, parent: str) -> None:
        os.makedirs(parent, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix="kcd-overlay-", dir=parent)
        weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)

    @property
    def entries(self) -> dict[int, np.ndarray | str]:
        """index -> encoded bytes, or the path of its overlay file (``overlay_dir``)."""
        return self._overlay

    def sync(self, summaries: list[dict[str, Any]]) -> None:
        """Brings the overlay in line with the summary log ``summaries``: applies the
        entries not applied yet, or rebuilds from the ORIGINAL files when the log is not an
        extension of what was applied (a resume, a new run). Each entry is
        ``{"epoch": int, "dst": int64 [P], "src": int64 [P], "eps": float64 [P]}``. A file
        that cannot be read raises naming it; the overlay is then left unchanged."""
        if not isinstance(summaries, (list, tuple)):
            raise TypeError(f"summaries must be a list of dicts, got {type(summaries).__name__}")
        k = len(self._applied)
        if is_prefix(self._applied, summaries):
            overlay, applied, todo = self._overlay, list(self._applied), list(summaries[k:])
        else:
            overlay, applied, todo = {}, [], list(summaries)
        if not todo and overlay is self._overlay:
            return
        created: list[str] = []  # overlay files written by this sync
        try:
            for s in todo:
                overlay = self._apply(overlay, s, created)
                applied.append(s)
        except BaseException:
            _remove_files(created)  # the committed overlay stays as it was
            raise
        kept = {v for v in overlay.values() if isinstance(v, str)}
        _remove_files(
            [v for v in self._overlay.values() if isinstance(v, str) and v not in kept]
            + [f for f in created if f not in kept]
        )
        self._overlay, self._applied = overlay, applied

    def _apply(self, overlay: dict[int, Any], s: dict[str, Any], created: list[str]) -> dict[int, Any]:
        """A new overlay with one summary applied (``overlay`` is not modified; overlay
        files it writes are appended to ``created``)."""
        try:
            dst = torch.as_tensor(s["dst"]).cpu()
            src = torch.as_tensor(s["src"]).cpu()
            eps = torch.as_tensor(s["eps"]).cpu()
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"a summary must hold dst / src / eps, got {sorted(s) if isinstance(s, dict) else s!r}"
            ) from err
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
        if dst.numel() and (min(int(dst.min()), int(src.min())) < 0 or max(int(dst.max()), int(src.max())) >= self.n):
            raise IndexError(f"summary indices must lie in [0, {self.n})")
        d_l, s_l, e_l = dst.tolist(), src.tolist(), eps.to(torch.float64).tolist()
        if len(set(d_l)) != len(d_l) or set(d_l) & set(s_l):
            raise ValueError("summary dst must be unique and disjoint from src (as kcd_fast.condense makes them)")

        def current(i: int) -> np.ndarray:  # the image of point i before this summary: [H, W, 3] uint8
            return _decode_entry(overlay[i]) if i in overlay else np.asarray(load_rgb(self._paths[i]))

        def blend_pair(j: int) -> np.ndarray:
            d_img, s_img = current(d_l[j]), current(s_l[j])
            if s_img.shape != d_img.shape:
                s_img = _resize(s_img, d_img.shape[:2])
            pair = np.stack([d_img, s_img])  # [2, H, W, 3]
            blend_(pair, np.array([0]), np.array([1]), np.array([e_l[j]]))
            return _encode(pair[0], self.format)

        in_memory = sum(int(v.nbytes) for v in overlay.values() if not isinstance(v, str))

        def store(i: int, data: np.ndarray) -> np.ndarray | str:
            nonlocal in_memory
            if self._dir is None and in_memory + data.nbytes <= self.budget:
                in_memory += data.nbytes
                return data
            if self._dir is None:  # past the budget: this and later entries go to files
                self._make_dir(tempfile.gettempdir())
                self._spilled = True
            self._files_made += 1
            ext = {OverlayFormat.PNM: "ppm", OverlayFormat.PNG: "png", OverlayFormat.JPEG: "jpg"}[self.format]
            path = os.path.join(self._dir, f"{i}-{self._files_made}.{ext}")
            created.append(path)
            with open(path, "wb") as f:
                f.write(data.tobytes())
            return path

        # dst and src are disjoint and dst unique, so no pair reads an image another pair writes:
        # chunked work equals reading everything before writing anything.
        pending: dict[int, np.ndarray | str] = {}
        with ThreadPoolExecutor(max_workers=self.num_threads) as pool:
            for c in range(0, len(d_l), _OVERLAY_CHUNK):
                js = range(c, min(c + _OVERLAY_CHUNK, len(d_l)))
                for j, enc in zip(js, pool.map(blend_pair, js), strict=True):
                    pending[d_l[j]] = store(d_l[j], enc)
        return {**overlay, **pending}

    def image(self, index: int) -> np.ndarray | None:
        """The summarised image of point ``index`` (uint8 ``[H, W, 3]``), or None when the
        point reads its original file."""
        data = self._overlay.get(int(index))
        return None if data is None else _decode_entry(data)

    @property
    def points(self) -> list[int]:
        """Sorted indices of the points whose overlay image replaces their file."""
        return sorted(self._overlay)

    @property
    def nbytes(self) -> int:
        """Bytes the overlay holds (in memory, or in its files with ``overlay_dir``)."""
        return sum(os.path.getsize(v) if isinstance(v, str) else int(v.nbytes) for v in self._overlay.values())

    @property
    def directory(self) -> str | None:
        """The private directory of the overlay files (``overlay_dir`` given, or made when the
        memory budget ran out), else None."""
        return self._dir

    @property
    def memory_bytes(self) -> int:
        """Bytes of encoded images held in memory (at most ``budget`` plus nothing: entries
        that would pass it go to files)."""
        return sum(int(v.nbytes) for v in self._overlay.values() if not isinstance(v, str))
