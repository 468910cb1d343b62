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
import stat
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


@needs_dali
@pytest.mark.timeout(120)
def test_a_fifo_named_jpg_raises_naming_it_on_the_dali_back_end(tmp_path: Path) -> None:
    ds = _folder(tmp_path / "f")
    ds.transform = None  # DALI decodes and augments itself
    fifo = ds.samples[8][0]
    _fifo(fifo)
    with bounded(90), pytest.raises(UnreadableSampleError) as info:
        for _ in KCDLoader(ds, SCHED, batch_size=4, backend="dali", vaks="off", augment="cifar", dali_device=None):
            pass
    assert str(info.value) == (
        f"image file '{fifo}' is a FIFO (named pipe), not a regular file (dataset index 8, epoch batch 2, "
        "backend='dali')"
    )
    assert (info.value.index, info.value.path) == (8, fifo)
    os.remove(fifo)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(fifo)
    os.chmod(fifo, 0)
    if os.access(fifo, os.R_OK):  # root reads anything: no permission case to test
        return
    with bounded(90), pytest.raises(UnreadableSampleError, match="cannot be read: permission denied"):
        list(KCDLoader(ds, SCHED, batch_size=4, backend="dali", vaks="off", augment="cifar", dali_device=None))


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
