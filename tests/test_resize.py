"""The overlay's bilinear resize (kcd/resize.h, ops.resize_bilinear): Pillow's
Image.resize(BILINEAR) bit for bit, and the numpy reference, on random images of many sizes
(up, down by large factors, one axis only, 1-pixel sides, unchanged), plus its argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kcd_fast import _reference as R
from kcd_fast.ops import resize_bilinear

SIZES = [
    ((5, 7), (5, 7)),
    ((1, 1), (3, 4)),
    ((3, 4), (1, 1)),
    ((20, 30), (20, 17)),  # one axis only
    ((20, 30), (33, 30)),
    ((37, 41), (12, 9)),  # downscale ~3-4x: wide filters
    ((9, 13), (40, 50)),  # upscale
    ((300, 401), (351, 389)),  # photo-like, mixed
    ((64, 1), (7, 5)),
]


def _pil(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    mode = "L" if img.shape[2] == 1 else "RGB"
    src = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode)
    out = np.asarray(src.resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    return out[:, :, None] if mode == "L" else out


@pytest.mark.parametrize(("src", "dst"), SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [3, 1])
def test_resize_equals_pillow_bit_for_bit(src: tuple[int, int], dst: tuple[int, int], seed: int, channels: int) -> None:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*src, channels), dtype=np.uint8)
    got = resize_bilinear(img, dst)
    assert isinstance(got, np.ndarray) and got.shape == (*dst, channels) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _pil(img, dst))


@pytest.mark.parametrize(("src", "dst"), SIZES[:7])
def test_resize_equals_the_numpy_reference(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear(img, dst), R.resize_bilinear(img, dst))
    t = torch.from_numpy(img[:, ::-1].copy()).permute(1, 0, 2)  # a non-contiguous torch view: copied
    got = resize_bilinear(t, dst)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), R.resize_bilinear(t.contiguous().numpy(), dst))


def test_resize_refuses_bad_arguments_naming_them() -> None:
    img = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match=r"size must be \(OH, OW\) with ints >= 1, got \(0, 3\)"):
        resize_bilinear(img, (0, 3))
    with pytest.raises(ValueError, match="size must be"):
        resize_bilinear(img, 7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="image must have dtype uint8, got float32"):
        resize_bilinear(img.astype(np.float32), (2, 2))
    with pytest.raises(ValueError, match=r"image must be 3-D \[H, W, C\], got shape \(4, 5\)"):
        resize_bilinear(img[:, :, 0], (2, 2))
    with pytest.raises(ValueError, match=r"image must have H, W, C >= 1, got shape \(0, 5, 3\)"):
        resize_bilinear(img[:0], (2, 2))
    with pytest.raises(ValueError, match=r"C = 1 or 3 .*got shape \(4, 5, 4\)"):
        resize_bilinear(np.zeros((4, 5, 4), np.uint8), (2, 2))  # RGBA: Pillow premultiplies alpha
    with pytest.raises(ValueError, match=r"got shape \(3, 64, 80\) \(channels first\? pass \[H, W, C\]\)"):
        resize_bilinear(np.zeros((3, 64, 80), np.uint8), (2, 2))
