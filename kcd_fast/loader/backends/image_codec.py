"""Decoding and encoding the folder overlay's images (kcd_fast/loader/backends/dali_overlay.py).

JPEG goes through torchcodec when it is installed (``pip install torchcodec``): the same
libjpeg-turbo that Pillow wraps, called with the same settings (accurate integer DCT, fancy
chroma upsampling, EXIF orientation applied; quality 95 with 4:2:0 chroma when encoding), so
the pixels decoded and the bytes encoded are identical to Pillow's (tests compare them), but
it decodes straight into a packed ``[H, W, 3]`` buffer the blend may overwrite (Pillow keeps
4 bytes per pixel and needs a copy out) and releases the GIL throughout: a pair's two
decodes 1.6x faster (benchmarks/scale.py). It also decodes and encodes on CUDA (nvJPEG),
which the GPU summariser uses.
Everything else (PNG, PPM, grey and CMYK JPEGs, files that do not end in an EOI marker,
anything torchcodec refuses) goes through Pillow, whose errors name the file. Set
``KCD_FAST_NO_TORCHCODEC=1`` to use Pillow only.

The batched tensor path (:func:`decode_rgb_batch`, :func:`resize_chw`, :func:`encode_chw`)
serves the overlay's device summariser: nvJPEG decoding and encoding and torch's
antialiased bilinear resize on the GPU where the DALI back end runs there.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from enum import Enum, unique
from typing import Any

import numpy as np
import torch

from ...data.errors import read_regular
from ...data.folders import UnreadableImageError, load_rgb

__all__ = [
    "OverlayFormat",
    "decode_rgb",
    "decode_rgb_batch",
    "encode",
    "encode_chw",
    "read_rgb",
    "resize_chw",
    "torchcodec_module",
]

JPEG_QUALITY = 95
_JPEG_SUBSAMPLING = 2  # PIL: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0 (libjpeg's default, torchcodec's)
_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"
_tc: Any = None  # the imported torchcodec, False when it cannot be imported


@unique
class OverlayFormat(str, Enum):
    """How summarised folder images are encoded (pnm, png lossless; jpeg lossy)."""

    PNM = "pnm"  # binary PPM: raw RGB behind a short header; decoding is a copy
    PNG = "png"  # deflate-compressed, level 1
    JPEG = "jpeg"  # quality 95, 4:2:0: lossy, about the size of the photo it replaces

    @property
    def extension(self) -> str:
        return {"pnm": "ppm", "png": "png", "jpeg": "jpg"}[self.value]


def torchcodec_module() -> Any:
    """torchcodec when installed and not switched off (``KCD_FAST_NO_TORCHCODEC=1``), else None."""
    global _tc
    if os.environ.get("KCD_FAST_NO_TORCHCODEC", "") not in ("", "0"):
        return None
    if _tc is None:
        try:
            import torchcodec.decoders
            import torchcodec.encoders

            _tc = torchcodec
        except Exception:  # not installed, or built for another torch: Pillow does it all
            _tc = False
    return _tc or None


def _decode_jpeg_tc(data: bytes) -> np.ndarray | None:
    """A baseline/progressive 3-component JPEG -> uint8 ``[H, W, 3]`` through torchcodec, or
    None where Pillow should decide (no torchcodec, not a complete JPEG, grey or CMYK, an
    error: Pillow then decodes it or raises naming the file)."""
    tc = torchcodec_module()
    if tc is None or not _is_jpeg(data):
        return None
    try:
        t = tc.decoders.decode_jpeg(data, mode="UNCHANGED")  # [C, H, W], a view of an [H, W, C] buffer
    except Exception:  # whatever torchcodec refuses, Pillow decides (decodes it or names the file)
        return None
    if t.dim() != 3 or t.shape[0] != 3:
        return None
    return t.permute(1, 2, 0).contiguous().numpy()  # no copy: already packed


def _is_jpeg(data: bytes) -> bool:
    return data.startswith(_SOI) and data.endswith(_EOI)


def decode_rgb_batch(
    datas: list[bytes], fallback: Callable[[int], np.ndarray], device: torch.device
) -> list[torch.Tensor]:
    """Encoded images -> uint8 ``[3, H, W]`` tensors on ``device``. The complete JPEGs among
    ``datas`` are decoded by torchcodec in one call (nvJPEG's batched decoder on CUDA,
    libjpeg-turbo on the CPU; EXIF orientation applied); the rest, and every image of a batch
    torchcodec refuses, by ``fallback(k)`` -> uint8 ``[H, W, 3]`` on the CPU (the overlay
    passes :func:`read_rgb` / :func:`decode_rgb`, whose errors name the file)."""
    tc = torchcodec_module()
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [k for k, d in enumerate(datas) if _is_jpeg(d)] if tc is not None else []
    if jpegs:
        try:
            decoded = tc.decoders.decode_jpeg([datas[k] for k in jpegs], mode="RGB", device=device)
        except Exception:  # one bad image fails the batch: each is then decoded (or named) alone
            decoded = [None] * len(jpegs)
        for k, t in zip(jpegs, decoded, strict=True):
            out[k] = t
    for k, t in enumerate(out):
        if t is None:
            out[k] = torch.from_numpy(fallback(k)).permute(2, 0, 1).to(device)
    return out  # type: ignore[return-value]


def resize_chw(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> ``[3, OH, OW]`` on its device: torch's antialiased bilinear
    filter (Pillow's triangle filter in float32, so within a level of
    :func:`kcd_fast.ops.resize_bilinear`), rounded half to even and clamped."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    x = torch.nn.functional.interpolate(
        img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )[0]
    return x.round_().clamp_(0, 255).to(torch.uint8)


def encode_chw(img: torch.Tensor, fmt: OverlayFormat) -> np.ndarray:
    """uint8 ``[3, H, W]`` on any device -> encoded bytes ``[nbytes]`` uint8 on the host
    (JPEG on the image's device through torchcodec, nvJPEG on CUDA; the rest on the CPU)."""
    tc = torchcodec_module()
    if fmt is OverlayFormat.JPEG and tc is not None:
        return tc.encoders.JpegEncoder(img.contiguous()).to_tensor(quality=JPEG_QUALITY).cpu().numpy()
    return encode(img.permute(1, 2, 0).cpu().numpy(), fmt)


def _dali_decode_rgb(data: bytes) -> np.ndarray | None:
    """``data`` decoded by DALI's CPU decoder (the one the DALI back end trains on), or None
    when DALI is absent or refuses it too."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return None
    enc = np.frombuffer(data, np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def one() -> Any:
        return fn.decoders.image(fn.external_source(source=lambda: [enc], batch=True), output_type=types.RGB)

    try:
        pipe = one()
        pipe.build()
        (out,) = pipe.run()
        a = np.array(out.at(0))
    except Exception:  # DALI cannot decode it either: the caller raises Pillow's error
        return None
    return a if a.ndim == 3 and a.shape[2] == 3 else None


def read_rgb(path: str) -> np.ndarray:
    """An image file -> uint8 ``[H, W, 3]`` RGB, writeable, EXIF orientation applied
    (:func:`kcd_fast.data.load_rgb`'s pixels and errors, :class:`kcd_fast.UnreadableSampleError`;
    the file is checked to be a regular file before it is read). A file Pillow refuses but DALI's
    decoder reads (a JPEG corrupt mid-stream: libjpeg-turbo warns and goes on) is decoded by
    DALI when it is installed: the overlay then blends the pixels the DALI back end trained
    on instead of stopping the run at the condensation that first reads the file."""
    data = read_regular(path)  # UnreadableSampleError for a missing or special file (never blocks)
    a = _decode_jpeg_tc(data) if data else None
    if a is not None:
        return a
    try:
        return np.array(load_rgb(path))  # Pillow decodes from the file (faster than from bytes)
    except UnreadableImageError:
        a = _dali_decode_rgb(data) if data else None
        if a is None:
            raise
        return a


def decode_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded overlay bytes (JPEG, PNG or PPM) -> uint8 ``[H, W, 3]`` RGB, writeable."""
    b = data if isinstance(data, bytes) else data.tobytes()
    a = _decode_jpeg_tc(b)
    if a is not None:
        return a
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(b))
        im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(f"an overlay image ({len(b)} bytes) cannot be decoded: {err}") from err
    return np.array(im if im.mode == "RGB" else im.convert("RGB"))


def encode(img: np.ndarray, fmt: OverlayFormat) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> the encoded bytes ``[nbytes]`` uint8."""
    h, w = img.shape[:2]
    if fmt is OverlayFormat.PNM:
        return np.frombuffer(f"P6\n{w} {h}\n255\n".encode() + np.ascontiguousarray(img).tobytes(), np.uint8)
    tc = torchcodec_module() if fmt is OverlayFormat.JPEG else None
    if tc is not None:
        if not (img.flags.c_contiguous and img.flags.writeable):  # torch refuses to wrap read-only memory
            img = np.array(img)
        chw = torch.from_numpy(img).permute(2, 0, 1)
        return tc.encoders.JpegEncoder(chw).to_tensor(quality=JPEG_QUALITY).numpy()
    from PIL import Image

    buf = io.BytesIO()
    if fmt is OverlayFormat.JPEG:
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=_JPEG_SUBSAMPLING)
    else:
        Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return np.frombuffer(buf.getvalue(), np.uint8)
