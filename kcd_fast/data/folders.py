"""Class-per-subfolder image datasets (JPEG, PNG, ...), the layout of ImageNet-style training sets.

:class:`ImageFolder` lists ``root/<class>/**/<image>`` in the order torchvision's
``ImageFolder`` uses (classes sorted by name, files sorted within each folder), so both
give the same indices, ``.samples``, ``.targets`` and ``.classes``. It reads images with
PIL for the torch back end; the DALI back end (``KCDLoader(..., backend="dali")``) reads
the same files through ``.samples`` with ``fn.io.file.read`` and decodes them in its
pipeline, never calling ``__getitem__``.

A file that is missing, is not a regular file (a FIFO, a socket, a device, a directory)
or cannot be decoded raises :class:`kcd_fast.UnreadableSampleError` naming the file (and,
from ``ImageFolder[i]``, the index ``i``) when the dataset is indexed, never a skip and
never a hang (a missing file: its subclass ``MissingSampleError``, a ``FileNotFoundError``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from torch.utils.data import Dataset

from .errors import UnreadableImageError, UnreadableSampleError, open_regular, sample_error

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "UnreadableImageError",
    "UnreadableSampleError",
    "decode_pil",
    "is_image_folder",
    "load_rgb",
]

# torchvision's IMG_EXTENSIONS: what ImageFolder counts as an image, for both back ends and
# the trainer's --data folders (DALI's decoder reads every one of these formats).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_folder(dataset: Any) -> bool:
    """True for a dataset of image files: a ``.samples`` list of ``(path, class_index)``
    pairs (:class:`ImageFolder`, torchvision's ``ImageFolder`` / ``DatasetFolder``)."""
    samples = getattr(dataset, "samples", None)
    if not isinstance(samples, (list, tuple)) or not samples:
        return False
    first = samples[0]
    return isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], (str, os.PathLike))


def load_rgb(path: str | os.PathLike[str], *, index: int | None = None) -> Any:
    """Decodes ``path`` into an RGB ``PIL.Image`` (fully loaded, EXIF orientation applied
    like DALI's ``fn.decoders.image``). The file is opened through
    :func:`kcd_fast.data.errors.open_regular` (without blocking, checked to be a regular
    file) and closed before this returns.

    Raises:
        MissingSampleError: the file does not exist (a ``FileNotFoundError``; names it).
        UnreadableSampleError: it is not a regular file, cannot be read or cannot be decoded
            (names it, the reason, and ``index`` when given).
    """
    p = os.fspath(path)
    with open_regular(p, index=index) as f:
        return decode_pil(f, p, index=index)


def decode_pil(data: bytes | BinaryIO, path: str, *, index: int | None = None) -> Any:
    """An encoded image (bytes, or the open file ``path``) -> an RGB ``PIL.Image``, fully
    loaded (it no longer needs the file), EXIF orientation applied;
    :class:`UnreadableSampleError` naming ``path`` when Pillow refuses it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        if rgb is im and getattr(im, "n_frames", 1) > 1:  # a multi-frame image may seek in its file later
            rgb = im.copy()
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
        why = "no image format Pillow reads" if isinstance(err, UnidentifiedImageError) else str(err)
        raise sample_error(path, f"cannot be decoded: {why}", index=index) from err
    return rgb


class ImageFolder(Dataset):
    """Images in ``root/<class_name>/...``, one class per subfolder.

    Args:
        root: the folder holding one subfolder per class (searched recursively, symlinks
            followed, like torchvision).
        transform: called as ``transform(image)`` on the RGB ``PIL.Image`` (torchvision
            transforms work directly). ``None``: the PIL image itself is returned.
        target_transform: called on the int class index.
        extensions: file name endings (case-insensitive) that count as images;
            default :data:`IMAGE_EXTENSIONS` (torchvision's list).

    Attributes:
        classes: ``[C]`` class names, sorted. ``class_to_idx``: name -> index.
        samples: ``[N]`` ``(path, class_index)`` pairs, in index order (``imgs`` aliases it).
        targets: ``[N]`` class indices (ints).

    ``dataset[i]`` is ``(transform(image_i), target_i)``. Raises ``FileNotFoundError`` /
    ``NotADirectoryError`` for a bad ``root`` and ``ValueError`` for a root without class
    folders or images, at construction; a file missing or unreadable by the time it is
    indexed raises :class:`kcd_fast.UnreadableSampleError` naming it and the index
    (``MissingSampleError``, a ``FileNotFoundError``, for a missing file).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__} {root!r}")
        for name, fn in (("transform", transform), ("target_transform", target_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        if isinstance(extensions, str) or not all(isinstance(e, str) and e for e in extensions) or not extensions:
            raise ValueError(
                f"extensions must be a non-empty sequence of file endings such as '.jpg', got {extensions!r}"
            )
        base = Path(root)
        if not base.exists():
            raise FileNotFoundError(f"ImageFolder root {str(base)!r} does not exist")
        if not base.is_dir():
            raise NotADirectoryError(f"ImageFolder root {str(base)!r} is not a directory")
        ext = tuple(e.lower() for e in extensions)
        classes = sorted(e.name for e in os.scandir(base) if e.is_dir())
        if not classes:
            raise ValueError(f"ImageFolder root {str(base)!r} holds no class subfolders (root/<class>/<image>)")
        samples: list[tuple[str, int]] = []
        for idx, cls in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(base / cls, followlinks=True)):
                for fname in sorted(files):
                    if fname.lower().endswith(ext):
                        samples.append((os.path.join(dirpath, fname), idx))
        if not samples:
            raise ValueError(f"ImageFolder root {str(base)!r} holds no images ending in {list(ext)}")
        self.root = str(base)
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.imgs = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.target_transform = target_transform
        self.extensions = ext

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        img = load_rgb(path, index=index)
        x = img if self.transform is None else self.transform(img)
        y = target if self.target_transform is None else self.target_transform(target)
        return x, y

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, n={len(self)}, classes={len(self.classes)})"
