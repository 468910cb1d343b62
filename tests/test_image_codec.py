"""The folder overlay's codec (kcd_fast/loader/backends/image_codec.py) and its one-pair blend:
torchcodec's JPEG decoding gives Pillow's pixels (sizes, chroma layouts, progressive, every
EXIF orientation) and its encoding Pillow's bytes; grey, CMYK, cut-short and padded files go
through Pillow (its pixels, its errors naming the file); the overlay is the same with and
without torchcodec; ``ops.blend_image_`` equals the numpy reference and refuses bad arguments."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kcd_fast import _reference as R
from kcd_fast import ops
from kcd_fast.data.folders import UnreadableImageError, load_rgb
from kcd_fast.loader.backends import image_codec as C
from kcd_fast.loader.backends.dali_overlay import FolderOverlay


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _pil_rgb(data: bytes, tmp_path: Path, name: str = "x.jpg") -> np.ndarray:
    p = tmp_path / name
    p.write_bytes(data)
    return np.asarray(load_rgb(p))


@pytest.fixture
def tc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KCD_FAST_NO_TORCHCODEC", raising=False)
    mod = C.torchcodec_module()
    if mod is None:
        pytest.skip("torchcodec is not installed (pip install torchcodec): the Pillow path is the only one")
    return mod


SHAPES = [(1, 1), (7, 13), (16, 16), (33, 17), (120, 95), (301, 402)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "kw",
    [{"quality": 90}, {"quality": 95, "subsampling": 0}, {"quality": 80, "subsampling": 1}, {"progressive": True}],
    ids=["420", "444", "422", "progressive"],
)
def test_torchcodec_decodes_pillows_pixels(tc, tmp_path: Path, shape, seed: int, kw: dict) -> None:
    data = _jpeg(_photo(*shape, seed), **kw)
    got = C._decode_jpeg_tc(data)
    assert got is not None and got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _pil_rgb(data, tmp_path))
    np.testing.assert_array_equal(C.decode_rgb(np.frombuffer(data, np.uint8)), got)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_torchcodec_applies_exif_orientation_like_pillow(tc, tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(_photo(21, 34, orientation), quality=92, exif=exif.tobytes())
    got = C._decode_jpeg_tc(data)
    want = _pil_rgb(data, tmp_path)
    assert got is not None and got.shape == want.shape == ((34, 21, 3) if orientation >= 5 else (21, 34, 3))
    np.testing.assert_array_equal(got, want)


def test_grey_cmyk_padded_and_cut_files_go_through_pillow(tc, tmp_path: Path) -> None:
    img = _photo(30, 40, 3)
    grey = _jpeg(img[..., 0])
    buf = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(buf, format="JPEG")
    cmyk = buf.getvalue()
    padded = _jpeg(img) + b"\x00" * 7  # bytes after the EOI marker: Pillow reads the image
    for name, data in (("grey", grey), ("cmyk", cmyk), ("padded", padded)):
        assert C._decode_jpeg_tc(data) is None, name
        p = tmp_path / f"{name}.jpg"
        p.write_bytes(data)
        np.testing.assert_array_equal(C.read_rgb(str(p)), np.asarray(load_rgb(p)))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(_jpeg(img)[:300])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        C.read_rgb(str(cut))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        C.read_rgb(str(tmp_path / "missing.jpg"))
    with pytest.raises(UnreadableImageError, match="300 bytes"):
        C.decode_rgb(_jpeg(img)[:300])


@pytest.mark.parametrize("shape", SHAPES)
def test_torchcodec_encodes_pillows_bytes(tc, monkeypatch: pytest.MonkeyPatch, shape) -> None:
    img = _photo(*shape, 5)
    fast = C.encode(img, C.OverlayFormat.JPEG).tobytes()
    ro = img.copy()
    ro.flags.writeable = False  # a read-only image is copied, not refused
    assert C.encode(ro, C.OverlayFormat.JPEG).tobytes() == fast
    monkeypatch.setenv("KCD_FAST_NO_TORCHCODEC", "1")
    assert C.torchcodec_module() is None
    assert C.encode(img, C.OverlayFormat.JPEG).tobytes() == fast


def test_overlay_is_the_same_with_and_without_torchcodec(tc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(_jpeg(_photo(40 + 3 * i, 50 - 2 * i, i), quality=90))
        paths.append(str(p))
    log = [
        {
            "epoch": 1,
            "dst": torch.tensor([0, 1, 2]),
            "src": torch.tensor([5, 6, 7]),
            "eps": torch.tensor([0.9, 0.7, 0.55]),
        },
        {"epoch": 2, "dst": torch.tensor([5, 3]), "src": torch.tensor([0, 4]), "eps": torch.tensor([0.8, 0.6])},
    ]
    got = {}
    for off in ("0", "1"):
        monkeypatch.setenv("KCD_FAST_NO_TORCHCODEC", off)
        ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=2)
        ov.sync(log)
        got[off] = {i: e.tobytes() for i, e in ov.entries.items()}
    assert got["0"] == got["1"] and sorted(got["0"]) == [0, 1, 2, 3, 5]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4, 3), (131073,), (256, 300, 3)])  # around the table's 2**17
def test_blend_image_equals_the_reference(seed: int, shape) -> None:
    rng = np.random.default_rng(seed)
    dst = rng.integers(0, 256, shape, dtype=np.uint8)
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    for eps in (0.0, 1.0, 0.5, float(rng.random())):
        want = R.blend(np.stack([dst, src]), [0], [1], [eps])[0]
        got = dst.copy()
        assert ops.blend_image_(got, src, eps) is got
        np.testing.assert_array_equal(got, want)
    t = torch.from_numpy(dst.copy())
    ops.blend_image_(t, torch.from_numpy(src), 0.3)
    np.testing.assert_array_equal(t.numpy(), R.blend(np.stack([dst, src]), [0], [1], [0.3])[0])


def test_blend_image_refuses_bad_arguments_before_writing() -> None:
    dst = np.full((4, 4, 3), 7, np.uint8)
    src = np.zeros((4, 4, 3), np.uint8)
    ro = dst.copy()
    ro.flags.writeable = False
    cases = [
        ((ro, src, 0.5), "dst"),
        ((dst, src[:2], 0.5), r"src must have dst's shape \(4, 4, 3\), got \(2, 4, 3\)"),
        ((dst, src, 1.5), "eps must be a float in \\[0, 1\\], got 1.5"),
        ((dst, src, float("nan")), "got nan"),
        ((dst, src, True), "got True"),
        ((dst, src, torch.tensor(True)), "got True"),
        ((dst, src, torch.tensor([0.5, 0.5])), "got tensor"),
        ((dst.astype(np.int16), src, 0.5), "dst"),
        ((dst, src.astype(np.float32), 0.5), "src"),
        ((dst[:, ::2], src[:, ::2], 0.5), "dst"),
    ]
    for args, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            ops.blend_image_(*args)
    assert (dst == 7).all()


def test_blend_image_refuses_overlapping_buffers() -> None:
    x = (np.arange(64, dtype=np.uint8) * 3).copy()
    with pytest.raises(ValueError, match=r"dst and src overlap in memory \(offset -1 bytes\)"):
        ops.blend_image_(x[1:], x[:-1], 0.3)
    np.testing.assert_array_equal(x, np.arange(64, dtype=np.uint8) * 3)  # nothing written
    want = R.blend(np.stack([x, x]), [0], [1], [0.3])[0]
    ops.blend_image_(x, x, 0.3)  # the same buffer: each byte reads only itself
    np.testing.assert_array_equal(x, want)


def _corrupt_mid_stream(tmp_path: Path) -> tuple[Path, bytes]:
    """A JPEG whose entropy-coded data has random bytes in the middle (markers intact): Pillow
    refuses it, libjpeg-turbo in DALI warns and decodes it."""
    data = bytearray(_jpeg(_photo(120, 160, 7), quality=90))
    rng = np.random.default_rng(3)
    mid = len(data) // 2
    data[mid : mid + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    p = tmp_path / "mid.jpg"
    p.write_bytes(bytes(data))
    return p, bytes(data)


def test_a_file_dali_decodes_but_pillow_refuses_is_read_with_dalis_decoder(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")
    p, data = _corrupt_mid_stream(tmp_path)
    with pytest.raises(UnreadableImageError):
        load_rgb(p)  # Pillow (and the torch back end) refuse it
    got = C.read_rgb(str(p))  # what the DALI back end trains on: the overlay blends the same pixels
    want = C._dali_decode_rgb(data)
    assert want is not None and got.shape == (120, 160, 3)
    np.testing.assert_array_equal(got, want)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff" + bytes(100))  # nothing decodes it: Pillow's error, naming the file
    with pytest.raises(UnreadableImageError, match="junk.jpg"):
        C.read_rgb(str(junk))


def _four_photos(root: Path, h: int, w: int) -> list[str]:
    paths = []
    for i in range(4):
        p = root / f"{i}.jpg"
        p.write_bytes(_jpeg(_photo(h, w, i)))
        paths.append(str(p))
    return paths


def test_overlay_errors_name_the_point_and_why_it_was_read(tmp_path: Path) -> None:
    paths = _four_photos(tmp_path, 20, 30)
    log = [{"epoch": 2, "dst": torch.tensor([0]), "src": torch.tensor([3]), "eps": torch.tensor([0.8])}]
    os.remove(paths[3])
    for device in (None, "cpu") if C.torchcodec_module() is not None else (None,):
        ov = FolderOverlay(paths, device=device)
        with pytest.raises(FileNotFoundError, match=r"3.jpg.*\(dataset index 3, read to summarise a condensation"):
            ov.sync(log)
        assert ov.points == []


def test_a_summary_that_writes_a_point_twice_names_it(tmp_path: Path) -> None:
    ov = FolderOverlay(_four_photos(tmp_path, 10, 12))
    for dst, src in (([0, 0], [1, 2]), ([0, 1], [1, 2])):
        log = [{"epoch": 1, "dst": torch.tensor(dst), "src": torch.tensor(src), "eps": torch.tensor([0.5, 0.5])}]
        with pytest.raises(ValueError, match=r"point\(s\) \[[01]\] appear twice in dst or in both"):
            ov.sync(log)
    assert ov.points == []
