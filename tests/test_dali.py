"""The DALI back end (``KCDLoader(..., backend="dali")``) on the CPU: the same per-epoch
point sets, images, summaries and state as the torch back end, the last partial batch,
exactly one read per surviving point per epoch (counted by the back end and, independently,
by Linux inotify on the image files), seeded augmentation, the image-folder overlay against
a PIL + numpy reference, bit-exact resume, and bad input. Tiny synthetic data."""

from __future__ import annotations

import collections
import gc
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bench_modules import load_benchmark
from datasets_for_tests import CifarLike

from kcd_fast import ArrayDataset, CondensationSchedule, ImageFolder, KCDLoader
from kcd_fast import _reference as R
from kcd_fast.data import UnreadableImageError, load_rgb
from kcd_fast.loader.backends.image_codec import torchcodec_module

FileOpens = load_benchmark("fileopens").FileOpens

C = 5  # classes
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.5)  # sizes of 97: [97, 77, 61, 61, 49, 49]
needs_dali = pytest.mark.needs_dali


def make_arrays(n: int, seed: int = 0, hw: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, hw, hw, 3] images and int64 [n] labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), rng.integers(0, C, n).astype(np.int64)


class Student:
    """Deterministic logits [B, C] from the images [B, 3, H, W] (so summaries change scores)."""

    def __init__(self, hw: int = 8, seed: int = 1):
        self.w = torch.randn(3 * hw * hw, C, generator=torch.Generator().manual_seed(seed)) * 0.4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) - 0.5) @ self.w


class TableStudent:
    """Logits [B, C] looked up by dataset index: the same observations whatever the images
    look like (augmented, decoded by PIL or DALI)."""

    def __init__(self, n: int, seed: int = 2):
        self.table = torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * 2

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def make_folder(root: Path, per_class: int = 8, classes: int = 3, seed: int = 0, size: int | None = None) -> Path:
    """root/c<k>/<i>.jpg|png: smooth random images (JPEG, every third a PNG), sizes 20..39
    pixels unless ``size`` fixes them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = (size, size) if size else rng.integers(20, 40, 2)
            base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize((int(w), int(h)), Image.Resampling.BILINEAR))
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.{'png' if i % 3 == 0 else 'jpg'}", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"))


def folder_dirs(ds: Any) -> list[str]:
    return sorted({os.path.dirname(p) for p, _ in ds.samples})


def run(loader: KCDLoader, student: Any, epochs: int, by_index: bool = False) -> list[list[tuple[torch.Tensor, ...]]]:
    """Trains ``epochs`` epochs; per epoch the batches ``(x, y, idx)`` it yielded (on the CPU:
    where torch sees a GPU, the DALI back end yields CUDA tensors)."""
    out = []
    for _ in range(epochs):
        batches = []
        for x, y, idx in loader:
            x, y = x.cpu(), y.cpu()
            loader.observe(idx, student(idx) if by_index else student(x))
            batches.append((x, y, idx))
        out.append(batches)
    return out


def assert_same_epochs(
    a: list[list[tuple[torch.Tensor, ...]]], b: list[list[tuple[torch.Tensor, ...]]], images: bool = True
) -> None:
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        assert len(ea) == len(eb)
        for (xa, ya, ia), (xb, yb, ib) in zip(ea, eb, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb)
            if images:
                assert xa.dtype == xb.dtype and torch.equal(xa, xb)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k == "bank":
            assert all(torch.equal(x[kk], y[kk]) if isinstance(x[kk], torch.Tensor) else x[kk] == y[kk] for kk in x)
        elif k == "summaries":
            assert len(x) == len(y) and all(
                s["epoch"] == t["epoch"] and all(torch.equal(s[f], t[f]) for f in ("dst", "src", "eps"))
                for s, t in zip(x, y, strict=True)
            )
        elif k == "order":  # what decides the batches: the same but for the back end that made them
            drop = ("backend", "augment")
            assert {f: v for f, v in x.items() if f not in drop} == {f: v for f, v in y.items() if f not in drop}
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k
        else:
            assert x == y, k


# -- the same epochs as the torch back end ------------------------------------------------------
@needs_dali
@pytest.mark.parametrize("drop_last", [False, True])
def test_arrays_match_torch_backend_epoch_by_epoch(drop_last: bool) -> None:
    """Same seed, same observations: the same batches (indices, images bit for bit, labels),
    condensations, summarised images and state; the last partial batch is delivered."""
    n, bs = 97, 16
    images, labels = make_arrays(n)
    runs = {}
    for backend in ("torch", "dali"):
        ds = ArrayDataset(images, labels)
        loader = KCDLoader(
            ds,
            SCHED,
            batch_size=bs,
            shuffle=True,
            drop_last=drop_last,
            seed=3,
            backend=backend,
            num_workers=0 if backend == "torch" else 2,
        )
        assert loader.steps_per_epoch() == [s // bs if drop_last else -(-s // bs) for s in SCHED.epoch_sizes(n)]
        runs[backend] = (loader, run(loader, Student(), SCHED.epochs), ds)
    (lt, et, dt), (ld, ed, dd) = runs["torch"], runs["dali"]
    assert_same_epochs(et, ed)
    for e, (size, batches) in enumerate(zip(SCHED.epoch_sizes(n), ed, strict=True)):
        assert len(batches) == lt.steps_per_epoch()[e]
        last = batches[-1][2].shape[0]
        assert last == (bs if drop_last or size % bs == 0 else size % bs)  # the partial batch is there
    assert any(size % bs for size in SCHED.epoch_sizes(n))  # (the schedule has partial batches)
    assert torch.equal(dt.images, dd.images) and not torch.equal(dd.images, torch.from_numpy(images))
    assert_same_state(lt.state_dict(), ld.state_dict())


@needs_dali
def test_torchvision_style_and_one_channel_arrays_match_torch_backend() -> None:
    n = 41
    images, labels = make_arrays(n, seed=4)
    sched = CondensationSchedule(epochs=4, period=2, rho=0.6)
    out = {}
    for backend in ("torch", "dali"):
        ds = CifarLike(images, labels)
        loader = KCDLoader(ds, sched, batch_size=8, shuffle=True, seed=5, backend=backend)
        out[backend] = (run(loader, Student(), sched.epochs), ds.data.copy())
    assert_same_epochs(out["torch"][0], out["dali"][0])
    np.testing.assert_array_equal(out["torch"][1], out["dali"][1])
    gray = ArrayDataset(images[..., 0], labels)  # [N, H, W]: one channel
    loader = KCDLoader(gray, sched, batch_size=8, backend="dali", vaks="off")
    x, y, idx = next(iter(loader))
    assert x.shape == (8, 1, 8, 8) and torch.equal(x.cpu(), gray.images[idx].unsqueeze(1).float() / 255.0)


@needs_dali
def test_folder_point_sets_match_torch_backend(folder: Path) -> None:
    """An image folder (augment "auto" = the ImageNet recipe on DALI, PIL + torchvision on
    torch): the same indices and labels every epoch for the same observations."""
    from torchvision.transforms import v2

    n = len(ImageFolder(folder))
    sched = CondensationSchedule(epochs=4, period=2, rho=0.5)
    tf = v2.Compose(
        [v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True), v2.ToDtype(torch.float32, scale=True)]
    )
    out = {}
    for backend in ("torch", "dali"):
        ds = ImageFolder(folder, transform=tf if backend == "torch" else None)
        loader = KCDLoader(ds, sched, batch_size=5, shuffle=True, seed=7, backend=backend, vaks="off")
        out[backend] = run(loader, TableStudent(n), sched.epochs, by_index=True)
        assert loader.active_indices.numel() == sched.epoch_sizes(n)[-1]
    assert_same_epochs(out["torch"], out["dali"], images=False)
    for batches in out["dali"]:
        for x, y, idx in batches:
            assert x.shape == (idx.shape[0], 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64


# -- reads ------------------------------------------------------------------------------------------
@needs_dali
def test_exactly_one_read_per_surviving_point_per_epoch(folder: Path) -> None:
    ds = ImageFolder(folder)
    n = len(ds)
    sched = CondensationSchedule(epochs=4, period=1, rho=0.4)
    loader = KCDLoader(ds, sched, batch_size=4, shuffle=True, seed=1, backend="dali", vaks="off", num_workers=2)
    student = TableStudent(n)
    opens = FileOpens(folder_dirs(ds))
    try:
        for e in range(sched.epochs):
            planned = loader.epoch_order().tolist()
            opens.drain()
            seen = []
            for _x, _y, idx in loader:
                loader.observe(idx, student(idx))
                seen += idx.tolist()
            got = opens.drain()
            assert seen == planned and len(planned) == sched.epoch_sizes(n)[e]
            assert got == collections.Counter(ds.samples[i][0] for i in planned), f"epoch {e}"  # each once, no other
            assert loader.backend.reads == {"points": len(planned), "files": len(planned), "overlay": 0, "arrays": 0}
    finally:
        opens.close()


@needs_dali
def test_last_partial_batch_and_empty_epoch_worked_example() -> None:
    """The module docstring's example: 10 points, batch_size 4 -> 4, 4, 2 (drop_last: 4, 4)."""
    from kcd_fast.loader.backends.dali import DaliBackend

    images, labels = make_arrays(10, seed=3)
    ds = ArrayDataset(images, labels)
    backend = DaliBackend(ds, storage=ds.images, batch_size=4, device_id=None)
    order = np.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    for drop_last in (False, True):
        plan = [order[k : k + 4] for k in range(0, 8 if drop_last else 10, 4)]
        out = list(backend.epoch_batches(plan, seed=1))
        assert [x.shape[0] for x, _ in out] == ([4, 4] if drop_last else [4, 4, 2])
        for (x, y), idx in zip(out, plan, strict=True):
            assert torch.equal(x, ds.images[idx].permute(0, 3, 1, 2).float() / 255.0)
            assert torch.equal(y, ds.labels[idx])
        assert backend.reads["points"] == backend.reads["arrays"] == (8 if drop_last else 10)
    assert list(backend.epoch_batches([], seed=1)) == [] and backend.reads["points"] == 0


# -- augmentation ---------------------------------------------------------------------------------
@needs_dali
def test_augmentation_is_seeded_per_epoch_and_thread_independent() -> None:
    from nvidia.dali import fn

    from kcd_fast.loader.backends.dali import CIFAR_MEAN, CIFAR_STD, DaliBackend

    images, labels = make_arrays(30, seed=5)
    ds = ArrayDataset(images, labels)
    plan = [np.arange(0, 12), np.arange(12, 24), np.arange(24, 30)]

    def epoch(augment: Any, seed: int, threads: int = 2) -> list[torch.Tensor]:
        b = DaliBackend(ds, storage=ds.images, batch_size=12, num_threads=threads, device_id=None, augment=augment)
        return [x for x, _ in b.epoch_batches(plan, seed)]

    def flip(images: Any, device: str) -> Any:  # a user callable: a random flip, float CHW
        return fn.transpose(fn.flip(images, horizontal=fn.random.coin_flip()), perm=[2, 0, 1])

    for augment in ("cifar", "imagenet", flip):
        a, b, c = epoch(augment, 11), epoch(augment, 11, threads=1), epoch(augment, 12)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # same seed: the same, any threads
        assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))  # another epoch seed: different
    # cifar: every output is a pad-4 crop of its image, maybe flipped, normalised
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CIFAR_STD).view(3, 1, 1) * 255
    for x, idx in zip(epoch("cifar", 3), plan, strict=True):
        assert x.shape == (idx.shape[0], 3, 8, 8)
        for j, i in enumerate(idx.tolist()):
            seen = x[j] * std + mean
            padded = torch.nn.functional.pad(ds.images[i].permute(2, 0, 1).float(), (4, 4, 4, 4))
            crops = [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
            assert any(torch.allclose(seen, c, atol=0.01) or torch.allclose(seen, c.flip(-1), atol=0.01) for c in crops)
    assert epoch("imagenet", 3)[0].shape == (12, 3, 224, 224)
    assert epoch("imagenet_eval", 3)[2].shape == (6, 3, 224, 224)
    assert torch.equal(epoch("cifar_eval", 3)[0], epoch("cifar_eval", 4)[0])  # no randomness


# -- VAKS -------------------------------------------------------------------------------------------
@needs_dali
def test_summarised_array_images_match_reference() -> None:
    n = 83
    images, labels = make_arrays(n, seed=2)
    ds = ArrayDataset(images, labels)
    sched = CondensationSchedule(epochs=6, period=2, rho=0.4)
    loader = KCDLoader(ds, sched, batch_size=10, shuffle=True, seed=11, backend="dali", num_workers=2)
    epochs = run(loader, Student(), sched.epochs)
    ref = images.copy()
    for s in loader.state_dict()["summaries"]:
        ref = R.blend(ref, s["dst"].numpy(), s["src"].numpy(), s["eps"].numpy())
    assert len(loader.history) == 3 and sum(h["pairs"] for h in loader.history) > 0
    np.testing.assert_array_equal(ds.images.numpy(), ref)
    for x, _y, idx in epochs[-1]:  # the last epoch read the summarised store
        assert torch.equal(x, torch.from_numpy(ref[idx.numpy()]).permute(0, 3, 1, 2).float() / 255.0)


def reference_overlay(ds: ImageFolder, summaries: list[dict[str, Any]]) -> dict[int, np.ndarray]:
    """The summarised folder images straight from the rules: PIL decode, PIL bilinear resize
    of src to dst's size, the numpy blend; each summary reads the images before it."""
    from PIL import Image

    current: dict[int, np.ndarray] = {}
    for s in summaries:
        new = {}
        for d, r, e in zip(s["dst"].tolist(), s["src"].tolist(), s["eps"].tolist(), strict=True):
            a = current.get(d, np.asarray(load_rgb(ds.samples[d][0])))
            b = current.get(r, np.asarray(load_rgb(ds.samples[r][0])))
            if b.shape != a.shape:
                b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))
            new[d] = R.blend(np.stack([a, b]), [0], [1], [e])[0]
        current.update(new)
    return current


def _entry_bytes(backend: Any, i: int) -> bytes:
    """The encoded overlay image of point i, held in memory or in an overlay file."""
    entry = backend._overlay.entries[i]
    if isinstance(entry, str):
        with open(entry, "rb") as f:
            return f.read()
    return entry.tobytes()


@needs_dali
@pytest.mark.parametrize("store", ["memory", "files"])
@pytest.mark.parametrize("overlay_format", ["pnm", "png"])  # lossless: exact pixels (jpeg: test_overlay.py)
def test_folder_overlay_after_condensations(folder: Path, tmp_path: Path, overlay_format: str, store: str) -> None:
    """Two condensations' summaries (the second reads a point the first summarised, sizes
    differ): the overlay equals the reference; an epoch decodes overlay points from memory
    (their files are not opened) and every other point from its file, once each; a new
    back end given the same log rebuilds the same bytes (resume); a log that is not an
    extension of the applied one is rebuilt from the original files."""
    from kcd_fast.loader.backends.dali import DaliBackend

    ds = ImageFolder(folder)
    t = torch.tensor
    log = [
        {"epoch": 1, "dst": t([3, 7, 12]), "src": t([10, 11, 20]), "eps": t([1.0, 0.85, 0.7], dtype=torch.float64)},
        {"epoch": 2, "dst": t([10, 5]), "src": t([3, 0]), "eps": t([0.9, 0.7], dtype=torch.float64)},
    ]
    ref = reference_overlay(ds, log)
    overlay_dir = tmp_path / "overlay" if store == "files" else None
    backend = DaliBackend(
        ds,
        batch_size=1,
        num_threads=2,
        device_id=None,
        augment=None,
        overlay_format=overlay_format,
        overlay_dir=overlay_dir,
    )
    for s in log:  # pushed by the core at each condensation; materialised with the next epoch
        backend.apply_summary(s)
    assert backend.overlay_points == []
    opens = FileOpens(folder_dirs(ds))
    try:
        plan = [np.array([i]) for i in (3, 0, 10, 7, 1, 12, 5)]
        it = backend.epoch_batches(plan, seed=0)  # materialises the overlay (reads its sources, once)
        opens.drain()
        out = list(it)
        got = opens.drain()
    finally:
        opens.close()
    assert backend.overlay_points == [3, 5, 7, 10, 12]
    for i in backend.overlay_points:
        np.testing.assert_array_equal(backend.overlay_image(i), ref[i])
    for (x, _y), idx in zip(out, plan, strict=True):
        i = int(idx[0])
        want = ref[i] if i in ref else np.asarray(load_rgb(ds.samples[i][0]))
        np.testing.assert_array_equal((x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), want)
    assert got == collections.Counter({ds.samples[0][0]: 1, ds.samples[1][0]: 1})  # only the two unsummarised
    assert backend.reads == {"points": 7, "files": 2, "overlay": 5, "arrays": 0}

    fresh = DaliBackend(
        ds, batch_size=1, device_id=None, augment=None, overlay_format=overlay_format, overlay_dir=overlay_dir
    )
    fresh.sync_overlay([{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in log])
    assert fresh.overlay_points == backend.overlay_points
    assert all(_entry_bytes(fresh, i) == _entry_bytes(backend, i) for i in fresh.overlay_points)  # same bytes
    fresh.sync_overlay(log[1:])  # not an extension of what it applied: rebuilt from the files
    assert fresh.overlay_points == [5, 10]
    np.testing.assert_array_equal(fresh.overlay_image(10), reference_overlay(ds, log[1:])[10])
    if store == "memory":
        assert backend.overlay_dir is None and backend.overlay_nbytes == sum(
            len(_entry_bytes(backend, i)) for i in backend.overlay_points
        )
        return

    # Files: content-addressed per summary in <overlay_dir>/kcd-overlay-<key>, shared by the
    # back ends of this dataset; a new back end given the same log reuses them (no pair is
    # decoded again); a failed summary leaves the overlay as it was; the directory goes with
    # its last user.
    assert os.path.dirname(fresh.overlay_dir) == str(overlay_dir) and fresh.overlay_dir == backend.overlay_dir
    assert all(os.path.dirname(v) == fresh.overlay_dir for v in fresh._overlay.entries.values())
    assert fresh.overlay_nbytes == sum(os.path.getsize(v) for v in fresh._overlay.entries.values())
    assert fresh._overlay.stats == {"pairs_made": 2, "summaries_made": 1, "summaries_reused": 2}
    again = [*log[1:], {"epoch": 3, "dst": t([10]), "src": t([1]), "eps": t([0.8], dtype=torch.float64)}]
    fresh.sync_overlay(again)
    assert fresh.overlay_points == [5, 10]
    np.testing.assert_array_equal(fresh.overlay_image(10), reference_overlay(ds, again)[10])
    entries = dict(fresh._overlay.entries)
    fresh._overlay._paths = [*fresh._paths[:-1], str(tmp_path / "missing.jpg")]  # the last point's file is gone
    bad = {"epoch": 4, "dst": t([2, 7]), "src": t([4, len(ds) - 1]), "eps": t([0.9, 0.9], dtype=torch.float64)}
    with pytest.raises(FileNotFoundError):
        fresh.sync_overlay([*again, bad])
    assert fresh._overlay.entries == entries and all(os.path.exists(v) for v in entries.values())
    shared = fresh.overlay_dir
    del fresh
    gc.collect()
    assert os.path.isdir(shared)  # `backend` still uses it
    del backend
    gc.collect()
    assert not os.path.exists(shared) and os.path.isdir(overlay_dir)


def core_summarises_folders(folder: Path) -> bool:
    """True when KCDLoader records summaries for a DALI image folder (the core wiring the
    DALI back end's overlay needs; see kcd_fast.loader.backends.dali)."""
    try:
        KCDLoader(ImageFolder(folder), SCHED, backend="dali")
    except ValueError as err:
        if "blends dropped images into the stored images" in str(err):
            return False
        raise
    return True


@needs_dali
@pytest.mark.parametrize(("store", "fmt"), [("memory", "pnm"), ("files", "pnm"), ("memory", "jpeg"), ("files", "jpeg")])
def test_folder_vaks_end_to_end_and_resume(folder: Path, tmp_path: Path, store: str, fmt: str) -> None:
    if not core_summarises_folders(folder):
        pytest.skip("KCDLoader does not yet record summaries for image folders (core wiring pending)")
    n = len(ImageFolder(folder))
    sched = CondensationSchedule(epochs=6, period=2, rho=0.45)
    kw: dict[str, Any] = dict(
        batch_size=4,
        shuffle=True,
        seed=9,
        backend="dali",
        num_workers=2,
        dali_overlay_dir=tmp_path / "overlay" if store == "files" else None,
        dali_overlay_format=fmt,
    )
    full = KCDLoader(ImageFolder(folder), sched, **kw)
    ref = run(full, TableStudent(n), sched.epochs, by_index=True)
    log = full.state_dict()["summaries"]
    assert log and full.backend.overlay_points == sorted({d for s in log for d in s["dst"].tolist()})
    want = reference_overlay(ImageFolder(folder), log)
    if fmt == "pnm":  # lossless: the reference blend exactly
        assert all(np.array_equal(full.backend.overlay_image(i), want[i]) for i in want)
    else:  # jpeg (quality 95, 4:2:0): close to it; a point summarised twice reads its own jpeg.
        # These 20..39-pixel images of saturated random colour cells are the worst case for
        # 4:2:0 chroma (photos: mean error ~0.9, tests/test_overlay.py); the bound says so.
        err = [np.abs(full.backend.overlay_image(i).astype(int) - want[i].astype(int)) for i in want]
        assert max(float(e.mean()) for e in err) < 4.0 and max(int(e.max()) for e in err) <= 60
    if store == "files":
        entries = full.backend._overlay.entries
        assert sorted(entries) == sorted(want) and full.backend.overlay_nbytes > 0
        assert all(os.path.dirname(v) == full.backend.overlay_dir for v in entries.values())

    stop = 3
    first = KCDLoader(ImageFolder(folder), sched, **kw)
    run(first, TableStudent(n), stop, by_index=True)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = KCDLoader(ImageFolder(folder), sched, **{**kw, "seed": 1234})
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = run(resumed, TableStudent(n), sched.epochs - stop, by_index=True)
    assert_same_epochs(ref[stop:], rest)  # indices, labels and augmented images, bit for bit
    assert_same_state(resumed.state_dict(), full.state_dict())
    if store == "files":  # the resumed loader read the summaries the earlier runs wrote
        stats = resumed.backend.overlay_stats
        assert stats["pairs_made"] == 0 and stats["summaries_reused"] == len(log)
        gpu = resumed.backend.device_id is not None and torchcodec_module() is not None
        assert stats["device"] == (f"cuda:{resumed.backend.device_id}" if gpu else "cpu threads")


# -- resume -----------------------------------------------------------------------------------------
@needs_dali
def test_resume_is_bit_exact(folder: Path) -> None:
    """Arrays (summaries replayed into the store) and a folder with the random ImageNet
    recipe: a resumed loader yields exactly the batches of the uninterrupted run."""
    images, labels = make_arrays(91, seed=6)
    sched = CondensationSchedule(epochs=6, period=2, rho=0.45)
    cases = [
        (lambda: ArrayDataset(images, labels), {"vaks": "low"}, False),
        (lambda: ImageFolder(folder), {"vaks": "off"}, True),
    ]
    for make, extra, by_index in cases:
        kw = dict(batch_size=12 if not by_index else 5, shuffle=True, seed=9, backend="dali", **extra)
        student = TableStudent(len(make())) if by_index else Student(seed=3)
        full = KCDLoader(make(), sched, **kw)
        ref = run(full, student, sched.epochs, by_index)
        first = KCDLoader(make(), sched, **kw)
        run(first, student, 3, by_index)
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = KCDLoader(make(), sched, **{**kw, "seed": 1234})
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert resumed.epoch == 3 and resumed.seed == 9
        assert_same_epochs(ref[3:], run(resumed, student, sched.epochs - 3, by_index))
        assert_same_state(resumed.state_dict(), full.state_dict())


# -- bad input -----------------------------------------------------------------------------------
@needs_dali
def test_missing_or_unreadable_file_raises_naming_it(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "f", per_class=4, classes=2, size=24)
    ds = ImageFolder(root)
    gone, bad = ds.samples[5][0], ds.samples[2][0]
    os.remove(gone)
    with pytest.raises(FileNotFoundError, match=f"image file '{gone}' is missing.*dataset index 5"):
        for _ in KCDLoader(ds, SCHED, batch_size=3, backend="dali", vaks="off"):
            pass
    with pytest.raises(FileNotFoundError, match=f"image file '{gone}' is missing"):
        ds[5]  # the torch back end's path (PIL) names it too
    shutil.copy(ds.samples[0][0], gone)
    Path(bad).write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match=f"image file '{bad}' cannot be decoded.*dataset index 2"):
        for _ in KCDLoader(ds, SCHED, batch_size=3, backend="dali", vaks="off"):
            pass
    with pytest.raises(UnreadableImageError, match=f"image file '{bad}' cannot be decoded"):
        ds[2]
    with pytest.raises(FileNotFoundError, match="ImageFolder root .* does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images ending in"):
        ImageFolder(tmp_path / "empty")


@needs_dali
def test_argument_checks(folder: Path) -> None:
    from kcd_fast.loader.backends.dali import DaliBackend

    ds = ArrayDataset(*make_arrays(10))
    with pytest.raises(ValueError, match="backend='dali' runs no worker processes.*collate_fn must be None"):
        KCDLoader(ds, SCHED, backend="dali", collate_fn=lambda b: b)
    with pytest.raises(ValueError, match="timeout must be 0, got 5"):
        KCDLoader(ds, SCHED, backend="dali", timeout=5)
    with pytest.raises(TypeError, match="backend='dali' reads kcd_fast.ArrayDataset.*got list"):
        DaliBackend([1, 2, 3], batch_size=2)
    with pytest.raises(ValueError, match="augment must be 'auto', None, one of 'none', 'cifar'.*got 'autoaugment'"):
        DaliBackend(ds, storage=ds.images, batch_size=2, augment="autoaugment")
    with pytest.raises(ValueError, match=r"dali_overlay_format\) must be 'pnm', 'png' or 'jpeg', got 'webp'"):
        KCDLoader(ImageFolder(folder), SCHED, backend="dali", dali_overlay_format="webp")
    with pytest.raises(TypeError, match=r"dali_overlay_dir\) must be a directory path or None, got int"):
        DaliBackend(ImageFolder(folder), batch_size=2, overlay_dir=5)
    with pytest.raises(ValueError, match="overlay_dir applies to image folders .*got overlay_dir='/tmp/x'"):
        KCDLoader(ds, SCHED, backend="dali", dali_overlay_dir="/tmp/x")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        DaliBackend(ds, storage=ds.images, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device_id \(KCDLoader: dali_device\)=0 but torch sees 0 CUDA device"):
            DaliBackend(ds, storage=ds.images, batch_size=2, device_id=0)
        with pytest.raises(ValueError, match=r"dali_device\)='cuda' but torch sees no CUDA device"):
            KCDLoader(ds, SCHED, backend="dali", dali_device="cuda")
    with pytest.raises(ValueError, match=r"dali_device\) must be 'auto', None, 'cpu', 'cuda', 'cuda:K' .*got 'gpu'"):
        KCDLoader(ds, SCHED, backend="dali", dali_device="gpu")
    with pytest.raises(ValueError, match=r"got 'cuda:x'"):
        DaliBackend(ds, storage=ds.images, batch_size=2, device_id="cuda:x")
    assert DaliBackend(ds, storage=ds.images, batch_size=2, device_id="cpu").device_id is None
    backend = DaliBackend(ImageFolder(folder), batch_size=2, device_id=None, augment=None)
    with pytest.raises(IndexError, match=r"summary indices must lie in \[0, 24\)"):
        backend.sync_overlay(
            [
                {
                    "epoch": 1,
                    "dst": torch.tensor([30]),
                    "src": torch.tensor([0]),
                    "eps": torch.tensor([0.8], dtype=torch.float64),
                }
            ]
        )
    assert backend.overlay_points == []
    with pytest.raises(RuntimeError, match="samples of different shapes"):  # folder of mixed sizes, no resize
        list(backend.epoch_batches([np.array([0, 1])], seed=0))
    with pytest.warns(UserWarning, match="ArrayDataset.transform is a torch-side transform"):
        DaliBackend(ArrayDataset(*make_arrays(10), transform=lambda x: x), storage=ds.images, batch_size=2)


def test_without_dali_import_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """DALI missing (its import blocked): backend='dali' says what to install; torch works."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    ds = ArrayDataset(*make_arrays(10))
    with pytest.raises(ImportError, match="backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130"):
        KCDLoader(ds, SCHED, batch_size=4, backend="dali")
    x, y, idx = next(iter(KCDLoader(ds, SCHED, batch_size=4)))
    assert x.shape == (4, 3, 8, 8) and idx.tolist() == [0, 1, 2, 3]


def test_image_folder_matches_torchvision(folder: Path) -> None:
    from torchvision.datasets import ImageFolder as TVImageFolder

    ours, theirs = ImageFolder(folder), TVImageFolder(str(folder))
    assert ours.samples == theirs.samples and ours.targets == theirs.targets and ours.classes == theirs.classes
    img, target = ours[4]
    assert img.mode == "RGB" and target == theirs[4][1]
    np.testing.assert_array_equal(np.asarray(img), np.asarray(theirs[4][0]))


# -- GPU ------------------------------------------------------------------------------------------
@needs_dali
@pytest.mark.needs_cuda
def test_gpu_pipeline_yields_cuda_tensors_equal_to_cpu(tmp_path: Path) -> None:
    """On a GPU: CUDA outputs through DLPack, equal to the CPU pipeline's where decoding is
    the same (arrays; PNG files, which DALI decodes on the CPU in both)."""
    from kcd_fast.loader.backends.dali import DaliBackend

    images, labels = make_arrays(20, seed=8)
    ds = ArrayDataset(images, labels)
    plan = [np.arange(0, 8), np.arange(8, 15)]
    for storage in (ds.images, ds.images.cuda()):
        gpu = DaliBackend(ds, storage=storage, batch_size=8, device_id=0)
        for (x, y), idx in zip(gpu.epoch_batches(plan, seed=2), plan, strict=True):
            assert x.is_cuda and torch.equal(x.cpu(), ds.images[idx].permute(0, 3, 1, 2).float() / 255.0)
            assert torch.equal(y.cpu(), ds.labels[idx])
    root = tmp_path / "png"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            from PIL import Image

            Image.fromarray(images[c * 4 + i]).save(root / f"c{c}" / f"{i}.png")
    folder_ds = ImageFolder(root)
    cpu = DaliBackend(folder_ds, batch_size=4, device_id=None, augment="cifar")
    gpu = DaliBackend(folder_ds, batch_size=4, device_id=0, augment="cifar")
    plan = [np.arange(0, 4), np.arange(4, 8)]
    for (xc, _), (xg, _) in zip(cpu.epoch_batches(plan, 5), gpu.epoch_batches(plan, 5), strict=True):
        assert xg.is_cuda and xg.shape == xc.shape == (4, 3, 32, 32)  # cifar on folders: 32 x 32


@needs_dali
def test_loader_passes_augment_to_dali_and_refuses_it_for_torch() -> None:
    ds = ArrayDataset(*make_arrays(12))
    with pytest.raises(ValueError, match="augment='cifar': an option of backend='dali' or 'tensor', not of"):
        KCDLoader(ds, SCHED, augment="cifar")
    loader = KCDLoader(ds, SCHED, batch_size=5, backend="dali", augment="cifar_eval", dali_device=None, seed=1)
    images, _, idx = next(iter(loader))
    assert images.dtype == torch.float32 and images.shape[0] == 5 and idx.shape == (5,)


@needs_dali
def test_rgb_recipes_refuse_grayscale_at_construction() -> None:
    ds = ArrayDataset(np.zeros((6, 8, 8), np.uint8), np.zeros(6, np.int64))
    with pytest.raises(ValueError, match="normalises 3 channels, but the images are single-channel"):
        KCDLoader(ds, SCHED, batch_size=2, backend="dali", augment="cifar", dali_device=None)


def _collect_garbage(_worker_id: int) -> None:
    import gc

    gc.collect()  # a forked child destroying what it inherited


@needs_dali
@pytest.mark.timeout(120)
def test_a_dali_loader_left_behind_does_not_hang_forked_workers() -> None:
    """A DALI loader dropped mid-epoch and not yet collected (its pipeline held in a reference
    cycle) is inherited by a forked DataLoader worker; collecting it there must not wait for
    the pipeline's threads, which the child does not have."""
    import gc

    ds = ArrayDataset(*make_arrays(40))
    loader = KCDLoader(ds, SCHED, batch_size=8, backend="dali", dali_device=None)
    it = iter(loader)
    next(it)
    gc.disable()
    try:
        holder: dict[str, Any] = {"it": it, "loader": loader}
        holder["self"] = holder  # a cycle: only the garbage collector frees it
        del loader, it, holder
        torch_loader = torch.utils.data.DataLoader(
            ds,
            batch_size=8,
            num_workers=2,
            worker_init_fn=_collect_garbage,
            timeout=30,
            multiprocessing_context="fork",
        )
        assert sum(1 for _ in torch_loader) == 5
    finally:
        gc.enable()
        gc.collect()


@needs_dali
def test_overlay_device_is_checked_and_cpu_keeps_the_threads(folder: Path) -> None:
    with pytest.raises(ValueError, match=r"dali_overlay_device\) must be 'auto', 'cpu' or 'gpu', got 'tpu'"):
        KCDLoader(ImageFolder(folder), SCHED, backend="dali", dali_device=None, dali_overlay_device="tpu")
    with pytest.raises(ValueError, match=r"dali_overlay_device\)='gpu' but DALI runs on the CPU \(dali_device\)"):
        KCDLoader(ImageFolder(folder), SCHED, backend="dali", dali_device=None, dali_overlay_device="gpu")
    for dev in ("auto", "cpu"):
        loader = KCDLoader(ImageFolder(folder), SCHED, backend="dali", dali_device=None, dali_overlay_device=dev)
        assert loader.backend.overlay_stats["device"] == "cpu threads"
