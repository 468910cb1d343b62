"""Bad data II (issue 29): special files never hang a back end (each FIFO case runs under a
timeout in the test itself), one error type names the file, the dataset index and the reason
on every back end, string samples batch like a DataLoader's, a persistent-worker DataLoader
over a summarised dataset is warned about, a full disk under the overlay names the directory
and the file and leaves no partial file, a deleted overlay directory is rebuilt, and bad
``tensor_device`` / ``augment`` values raise naming the option."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

import kcd_fast
from kcd_fast import (
    ArrayDataset,
    CondensationSchedule,
    ImageFolder,
    KCDBatchSampler,
    KCDLoader,
    MissingSampleError,
    UnreadableSampleError,
    WithIndices,
)
from kcd_fast.data import load_rgb
from kcd_fast.loader.backends.dali_overlay import FolderOverlay

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.needs_dali
SCHED = CondensationSchedule(1, 1)


@contextmanager
def bounded(seconds: int) -> Iterator[None]:
    """Fails the test (instead of hanging it) when the block runs longer than ``seconds``."""

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the block ran longer than {seconds} s: a read blocked")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _folder(root: Path, per_class: int = 6, classes: int = 2) -> ImageFolder:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    return ImageFolder(root, transform=_to_tensor)


def _to_tensor(im: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _fifo(path: str) -> None:
    os.remove(path)
    os.mkfifo(path)


# -- special files and the one error type ---------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_fifo_named_jpg_raises_naming_it_on_the_torch_back_end(tmp_path: Path, num_workers: int) -> None:
    ds = _folder(tmp_path / "f")
    fifo = ds.samples[8][0]
    _fifo(fifo)
    want = f"image file '{fifo}' is a FIFO (named pipe), not a regular file (dataset index 8, backend='torch')"
    with bounded(60), pytest.raises(UnreadableSampleError) as info:
        for _ in KCDLoader(ds, SCHED, batch_size=4, vaks="off", num_workers=num_workers):
            pass
    assert want in str(info.value)
    assert (info.value.index, info.value.path) == (8, fifo)
    if num_workers == 0:
        assert str(info.value) == want and info.value.reason == "is a FIFO (named pipe), not a regular file"
    with bounded(30), pytest.raises(UnreadableSampleError, match="is a FIFO"):
        load_rgb(fifo)  # the reader itself never opens it blocking
    with bounded(30), pytest.raises(UnreadableSampleError, match=r"is a FIFO.*\(dataset index 8\)$"):
        ds[8]


def test_the_torch_back_end_names_the_index_for_every_unreadable_sample(tmp_path: Path) -> None:
    ds = _folder(tmp_path / "f")
    bad, gone, folder = ds.samples[2][0], ds.samples[5][0], ds.samples[7][0]
    Path(bad).write_bytes(b"not an image at all")
    with pytest.raises(UnreadableSampleError) as info:
        list(KCDLoader(ds, SCHED, batch_size=4, vaks="off"))
    assert str(info.value) == (f"image file '{bad}' cannot be decoded: no image format Pillow reads (dataset index 2)")
    assert isinstance(info.value, kcd_fast.data.UnreadableImageError) and isinstance(info.value, OSError)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(bad)
    os.remove(gone)
    with pytest.raises(MissingSampleError) as missing:
        list(KCDLoader(ds, SCHED, batch_size=4, vaks="off"))
    assert isinstance(missing.value, FileNotFoundError)
    assert str(missing.value) == f"image file '{gone}' is missing (dataset index 5, backend='torch')"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(gone)
    os.remove(folder)
    os.mkdir(folder)
    with pytest.raises(UnreadableSampleError, match=r"is a directory, not a regular file \(dataset index 7, "):
        list(KCDLoader(ds, SCHED, batch_size=4, vaks="off"))


def test_a_torchvision_folder_gets_the_same_error(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    ds = _folder(tmp_path / "f")
    tv = torchvision.datasets.ImageFolder(str(tmp_path / "f"), transform=_to_tensor)
    bad, fifo = tv.samples[3][0], tv.samples[9][0]
    Path(bad).write_bytes(b"junk")
    with pytest.raises(UnreadableSampleError) as info:
        list(KCDLoader(tv, SCHED, batch_size=4, vaks="off"))
    assert str(info.value).startswith(f"image file '{bad}' cannot be read: UnidentifiedImageError: ")
    assert str(info.value).endswith("(dataset index 3, backend='torch')") and info.value.index == 3
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(bad)
    _fifo(fifo)
    with bounded(60), pytest.raises(UnreadableSampleError) as info:
        list(KCDLoader(tv, SCHED, batch_size=4, vaks="off"))
    assert str(info.value) == (
        f"image file '{fifo}' is a FIFO (named pipe), not a regular file (dataset index 9, backend='torch')"
    )
    del ds


def test_the_error_survives_pickling_with_its_fields() -> None:
    import pickle

    err = MissingSampleError("image file '/x/a.jpg' is missing (dataset index 3)", path="/x/a.jpg", index=3, reason="r")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is MissingSampleError and (back.path, back.index, back.reason) == ("/x/a.jpg", 3, "r")
    parsed = UnreadableSampleError("Caught ... image file '/y/b.png' cannot be decoded: x (dataset index 12, ...)")
    assert (parsed.path, parsed.index) == ("/y/b.png", 12)  # what a DataLoader worker's re-raise keeps


DALI_FIFO = """
import sys
from kcd_fast import CondensationSchedule, ImageFolder, KCDLoader, UnreadableSampleError

ds = ImageFolder(sys.argv[1])
try:
    for _ in KCDLoader(ds, CondensationSchedule(1, 1), batch_size=4, backend="dali", vaks="off", augment="cifar",
                       dali_device=sys.argv[2] if sys.argv[2] != "cpu" else None):
        pass
except UnreadableSampleError as err:
    print("RAISED", type(err).__name__, err.index, err.path, "|", err, flush=True)
"""


@needs_dali
@pytest.mark.timeout(180)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_a_fifo_named_jpg_raises_naming_it_on_the_dali_back_end(tmp_path: Path, device: str) -> None:
    ds = _folder(tmp_path / "f")
    fifo = ds.samples[8][0]
    _fifo(fifo)
    script = tmp_path / "fifo.py"
    script.write_text(DALI_FIFO)
    # in a subprocess under a timeout: DALI's reader blocks in C++, where no signal reaches Python
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "f"), device], capture_output=True, text=True, timeout=150
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == (
        f"RAISED UnreadableSampleError 8 {fifo} | image file '{fifo}' is a FIFO (named pipe), not a regular file "
        "(dataset index 8, epoch batch 2, backend='dali')"
    )


@needs_dali
def test_an_unreadable_file_raises_naming_it_on_the_dali_back_end(tmp_path: Path) -> None:
    ds = _folder(tmp_path / "f")
    ds.transform = None  # DALI decodes and augments itself
    gone, locked = ds.samples[5][0], ds.samples[2][0]
    os.remove(gone)
    with pytest.raises(MissingSampleError) as info:
        list(KCDLoader(ds, SCHED, batch_size=4, backend="dali", vaks="off", augment="cifar", dali_device=None))
    assert str(info.value) == f"image file '{gone}' is missing (dataset index 5, epoch batch 1, backend='dali')"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(gone)
    os.chmod(locked, 0)
    if os.access(locked, os.R_OK):  # root reads anything: no permission case to test here
        return
    with pytest.raises(UnreadableSampleError) as info:
        list(KCDLoader(ds, SCHED, batch_size=4, backend="dali", vaks="off", augment="cifar", dali_device=None))
    assert str(info.value) == (
        f"image file '{locked}' cannot be read: permission denied (dataset index 2, epoch batch 0, backend='dali')"
    )


# -- batches of non-tensor samples: torch's default_collate, then the indices -----------------------
class Items(Dataset):
    def __init__(self, items: list[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _pairs(items: list[Any], batch_size: int = 4) -> list[tuple[Any, list[Any]]]:
    """Each KCDLoader batch beside the DataLoader batch of the same indices."""
    loader = KCDLoader(Items(items), SCHED, batch_size=batch_size, vaks="off")
    out = []
    for batch in loader:
        idx = batch[-1]
        out.append((batch, default_collate([items[i] for i in idx.tolist()])))
    return out


def test_strings_batch_as_one_list_like_a_dataloader() -> None:
    texts = [f"text {i}" for i in range(10)]
    batches = list(KCDLoader(Items(texts), SCHED, batch_size=4, vaks="off"))
    assert [len(b) for b in batches] == [2, 2, 2]  # (list_of_str, indices): unpacks as `texts, idx`
    for got, want in _pairs(texts):
        strings, idx = got
        assert strings == want == [texts[i] for i in idx.tolist()] and type(strings) is list
        assert idx.dtype == torch.int64


def test_dicts_tuples_and_nested_tuples_follow_default_collate_with_the_indices_last() -> None:
    dicts = [{"text": f"t{i}", "label": i, "pair": (i, f"s{i}")} for i in range(7)]
    for (got_dict, idx), want in _pairs(dicts):
        assert got_dict.keys() == want.keys() and got_dict["text"] == want["text"]
        assert torch.equal(got_dict["label"], want["label"]) and torch.equal(got_dict["label"], idx)
        assert torch.equal(got_dict["pair"][0], want["pair"][0]) and got_dict["pair"][1] == want["pair"][1]
    nested = [(f"t{i}", (i, (f"a{i}", float(i)))) for i in range(7)]
    for got, want in _pairs(nested, 3):
        assert len(got) == 3  # the sample's 2 fields, then the indices
        text, (num, (inner, flt)), idx = got
        assert text == want[0] and torch.equal(num, want[1][0]) and inner == want[1][1][0]
        assert torch.equal(flt, want[1][1][1]) and torch.equal(num, idx)
    one = [(f"t{i}",) for i in range(5)]  # 1-tuples of strings: default_collate gives [tuple_of_str]
    for (texts, idx), want in _pairs(one, 2):
        assert [texts] == want and texts == tuple(f"t{i}" for i in idx.tolist())


# -- KCDBatchSampler under persistent workers ------------------------------------------------------
class NumpyData(Dataset):
    """A torchvision-style dataset: uint8 ``.data`` [N, H, W, C] (numpy, not shared) and ``.targets``."""

    def __init__(self, n: int = 16):
        self.data = np.random.default_rng(0).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
        self.targets = list(range(n))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.data[i].copy()), self.targets[i]


PERSISTENT = (
    "KCDBatchSampler: the DataLoader has persistent_workers=True, and VAKS blends summaries into NumpyData's "
    "images in this process's memory, which its workers do not share: after the first condensation they would "
    "keep yielding the images from before it. Pass persistent_workers=False, vaks='off', or keep the images in "
    "a kcd_fast.ArrayDataset (shared memory)"
)


def _persistent_run(dataset: Any, persistent: bool, **kw: Any) -> list[warnings.WarningMessage]:
    sampler = KCDBatchSampler(dataset, CondensationSchedule(2, 1, rho=0.5), batch_size=4, seed=0, **kw)
    loader = DataLoader(WithIndices(dataset), batch_sampler=sampler, num_workers=1, persistent_workers=persistent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for *_, idx in loader:
                sampler.observe(idx, torch.randn(idx.shape[0], 3))
    return [w for w in caught if "persistent_workers" in str(w.message)]


def test_batch_sampler_warns_once_about_persistent_workers_over_unshared_images() -> None:
    caught = _persistent_run(NumpyData(), True)
    assert [str(w.message) for w in caught] == [PERSISTENT]  # once, over two epochs
    assert _persistent_run(NumpyData(), False) == []
    assert _persistent_run(NumpyData(), True, vaks="off") == []  # nothing is summarised
    shared = ArrayDataset(np.zeros((16, 4, 4, 3), np.uint8), np.arange(16))  # shared memory: workers see blends
    assert _persistent_run(shared, True) == []


# -- the folder overlay: a full disk, a deleted directory ------------------------------------------
LOG = [
    {"epoch": 1, "dst": torch.tensor([1, 4]), "src": torch.tensor([9, 10]), "eps": torch.tensor([0.9, 0.8]).double()},
    {"epoch": 2, "dst": torch.tensor([9, 2]), "src": torch.tensor([1, 3]), "eps": torch.tensor([0.85, 0.7]).double()},
]


def _photos(root: Path, n: int = 12) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = root / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


@contextmanager
def disk_full_under(directory: Path, after: int = 0) -> Iterator[list[str]]:
    """``os.write`` to a file under ``directory`` writes ``after`` bytes, then fails with ENOSPC
    (a full disk); writes elsewhere (pytest's own) are untouched. Yields the files it cut."""
    real = os.write
    cut: list[str] = []

    def write(fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(str(directory)):
            return real(fd, data)
        cut.append(target)
        if after and os.fstat(fd).st_size < after:
            return real(fd, bytes(memoryview(data)[:after]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.write = write  # type: ignore[assignment]
    try:
        yield cut
    finally:
        os.write = real  # type: ignore[assignment]


def _tmp_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.tmp"))


def test_a_full_disk_under_overlay_dir_names_it_and_the_file_and_leaves_no_partial_file(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "photos")
    where = tmp_path / "overlays"
    ov = FolderOverlay(paths, overlay_format="png", overlay_dir=where)
    with disk_full_under(where, after=100) as cut:
        for _ in range(2):  # a retry leaves nothing behind either
            with pytest.raises(OSError) as info:
                ov.sync(LOG)
            err = info.value
            assert err.errno == errno.ENOSPC
            msg = str(err)
            assert msg.startswith(f"[Errno 28] dali_overlay_dir '{where}': writing the overlay file '{ov.directory}/")
            assert msg.endswith(
                ".png' failed: No space left on device (the partial file was removed); free space there or pass "
                "another directory"
            )
            assert _tmp_files(where) == []  # the partial file (100 bytes written) is gone
    assert cut and ov.points == []  # nothing applied: the overlay is as before
    ov.sync(LOG)  # space again: it completes
    assert ov.points == [1, 2, 4, 9]


def test_a_full_disk_past_the_memory_budget_names_the_spill_directory(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "photos")
    ov = FolderOverlay(paths, overlay_format="pnm", budget=0)  # every entry spills to files
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    with disk_full_under(tmp / "kcd-overlay-") as cut, pytest.raises(OSError) as info:
        ov.sync(LOG)
    assert cut and info.value.errno == errno.ENOSPC
    spill = os.path.dirname(cut[0])
    assert str(info.value).startswith(
        f"[Errno 28] the overlay's spill directory '{spill}' (past dali_overlay_budget=0): writing the overlay "
        f"file '{spill}/1-1.ppm' failed: No space left on device (the partial file was removed)"
    )
    assert os.listdir(spill) == [] and ov.points == []


def test_a_deleted_overlay_directory_is_made_again_and_rebuilt_from_the_log(tmp_path: Path) -> None:
    import shutil

    paths = _photos(tmp_path / "photos")
    ov = FolderOverlay(paths, overlay_format="png", overlay_dir=tmp_path / "overlays")
    ov.sync(LOG[:1])
    before = {i: ov.image(i) for i in ov.points}
    shutil.rmtree(ov.directory)
    with pytest.warns(UserWarning, match=r"overlay directory '.*' \(or files in it\) was deleted while the loader"):
        ov.sync(LOG)
    assert ov.points == [1, 2, 4, 9] and os.path.isdir(ov.directory)
    assert all(os.path.exists(v) for v in ov.entries.values()) and len(list(Path(ov.directory).glob("*.done"))) == 2
    fresh = FolderOverlay(paths, overlay_format="png")
    fresh.sync(LOG)
    for i in ov.points:
        np.testing.assert_array_equal(ov.image(i), fresh.image(i))
    np.testing.assert_array_equal(ov.image(4), before[4])
    spilled = FolderOverlay(paths, overlay_format="pnm", budget=0)
    spilled.sync(LOG[:1])
    shutil.rmtree(spilled.directory)
    with pytest.warns(UserWarning, match="rebuilt from the summary log"):
        spilled.sync(LOG)
    assert all(os.path.exists(v) for v in spilled.entries.values()) and spilled.points == [1, 2, 4, 9]
    np.testing.assert_array_equal(spilled.image(9), fresh.image(9))


def test_the_overlay_never_opens_a_fifo_it_summarises(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "photos")
    _fifo(paths[10])
    ov = FolderOverlay(paths, overlay_format="png")
    with bounded(30), pytest.raises(UnreadableSampleError) as info:
        ov.sync(LOG)
    assert str(info.value) == (
        f"image file '{paths[10]}' is a FIFO (named pipe), not a regular file (dataset index 10, read to "
        "summarise a condensation's VAKS pairs)"
    )
    assert ov.points == []


@needs_dali
@pytest.mark.timeout(180)
def test_a_dali_run_rebuilds_its_deleted_overlay_directory(tmp_path: Path) -> None:
    import shutil

    ds = _folder(tmp_path / "f", per_class=8)
    ds.transform = None
    sched = CondensationSchedule(3, 1, rho=0.5)
    kw = dict(batch_size=4, backend="dali", augment="cifar", dali_device=None, seed=0)
    loader = KCDLoader(ds, sched, dali_overlay_dir=tmp_path / "ov", dali_overlay_format="png", **kw)
    rng = torch.Generator().manual_seed(0)
    for epoch in range(3):
        if epoch == 2:
            shutil.rmtree(loader.backend.overlay_dir)  # deleted while the run lives
            ctx: Any = pytest.warns(UserWarning, match="was deleted while the loader used it")
        else:
            ctx = warnings.catch_warnings()
        with ctx:
            for _x, _y, idx in loader:
                loader.observe(idx, torch.randn(idx.shape[0], 3, generator=rng))
        assert bool(loader.backend.overlay_points) == (epoch >= 1)  # synced at the epoch's start
    assert os.path.isdir(loader.backend.overlay_dir) and loader.epoch == 3
    pts = loader.backend.overlay_points
    ref = KCDLoader(ds, sched, dali_overlay_format="png", **kw)  # in memory, rebuilt from the files
    ref.load_state_dict(loader.state_dict())
    ref.backend.sync_overlay()
    assert ref.backend.overlay_points == pts
    np.testing.assert_array_equal(loader.backend.overlay_image(pts[0]), ref.backend.overlay_image(pts[0]))


# -- options checked, naming the option -------------------------------------------------------------
def _arrays() -> ArrayDataset:
    return ArrayDataset(np.zeros((8, 8, 8, 3), np.uint8), np.arange(8))


def test_tensor_device_cuda_without_cuda_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, as one without a GPU
    for want in ("cuda", "cuda:0"):
        with pytest.raises(ValueError) as info:
            KCDLoader(_arrays(), SCHED, batch_size=4, backend="tensor", tensor_device=want)
        assert str(info.value) == (
            f"tensor_device={want!r} but torch sees no CUDA device on this machine (torch.cuda.is_available() is "
            "False); pass tensor_device='auto' to make batches where the images live"
        )
    for bad in ("gpu", "tpu", 1.5):
        with pytest.raises(ValueError, match=rf"tensor_device must be 'auto', 'cpu', 'cuda' or 'cuda:K', got {bad!r}"):
            KCDLoader(_arrays(), SCHED, batch_size=4, backend="tensor", tensor_device=bad)


def forgets_to_return(images: torch.Tensor, generator: torch.Generator) -> None:
    images.mul_(2)


def returns_numpy(images: torch.Tensor, generator: torch.Generator) -> np.ndarray:
    return images.numpy()


def drops_a_row(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return images[1:]


def test_tensor_augment_callables_returning_no_batch_name_the_option() -> None:
    cases = [
        (forgets_to_return, TypeError, "augment=forgets_to_return must return the batch as a float tensor "
         "[b, C, H, W] (augment(images, generator) -> images), got NoneType (did it forget to return?)"),
        (returns_numpy, TypeError, "augment=returns_numpy must return the batch as a float tensor [b, C, H, W] "
         "(augment(images, generator) -> images), got ndarray"),
        (drops_a_row, ValueError, "augment=drops_a_row must return a [b = 4, C, H, W] tensor on cpu, got "
         "(3, 3, 8, 8) on cpu"),
    ]  # fmt: skip
    for fn, exc, want in cases:
        loader = KCDLoader(_arrays(), SCHED, batch_size=4, backend="tensor", augment=fn)
        with pytest.raises(exc) as info:
            next(iter(loader))
        assert str(info.value) == want


def dali_forgets_to_return(images: Any, device: str) -> None:
    from nvidia.dali import fn

    fn.flip(images)


@needs_dali
def test_dali_augment_callables_returning_no_data_node_name_the_option() -> None:
    loader = KCDLoader(_arrays(), SCHED, batch_size=4, backend="dali", augment=dali_forgets_to_return, dali_device=None)
    with pytest.raises(TypeError) as info:
        next(iter(loader))
    assert str(info.value) == (
        "augment=dali_forgets_to_return must return the DALI DataNode of the augmented images (augment(images, "
        "device) -> DataNode, built from fn.* operators), got NoneType (did it forget to return?)"
    )
