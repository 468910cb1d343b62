"""Data for the KD trainer and the benchmarks: generated, shipped and user-supplied arrays.

- :func:`synthetic_arrays`: a class-conditional, learnable, CIFAR-shaped set generated in code
  (the main job's default data: nothing is downloaded);
- :func:`digits_arrays`: scikit-learn's digits (real data shipped inside scikit-learn);
- :func:`load_arrays`: an ``.npz`` or a class-per-folder image directory (read with
  :class:`kcd_fast.ImageFolder`, the one folder reader of the project);
- :func:`split_arrays`: a stratified, seeded train/test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._checks import is_finite_number, is_int
from ..data.folders import ImageFolder, load_rgb

__all__ = ["digits_arrays", "load_arrays", "split_arrays", "synthetic_arrays"]


def synthetic_arrays(
    n: int,
    *,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    world_seed: int = 2207,
    mix: float = 0.45,
    noise: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """A class-conditional, learnable, CIFAR-shaped image set generated in code.

    Each class owns two coloured sine gratings (orientation, frequency, colour) and a
    coloured Gaussian blob at a class position; these come from ``world_seed``, so train and
    test sets made with different ``seed`` share the classes. Each image shows its class's
    pattern at a random phase, blob jitter and contrast, blended with up to ``mix`` of
    another class's pattern (ambiguous points: the values KCD ranks differ), plus Gaussian
    pixel noise. Returns uint8 ``[n, S, S, 3]`` images and int64 ``[n]`` labels (balanced).
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not is_int(image_size) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
    if not (is_finite_number(mix) and 0.0 <= mix < 0.5):
        raise ValueError(f"mix must be in [0, 0.5) (the true class must dominate), got {mix!r}")
    if not (is_finite_number(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    k, s = num_classes, image_size
    world = np.random.default_rng([world_seed, k, s])
    theta = world.uniform(0.0, np.pi, (k, 2))
    freq = world.uniform(1.5, 5.0, (k, 2))
    color = world.normal(0.0, 1.0, (k, 3, 3))
    color /= np.linalg.norm(color, axis=2, keepdims=True)
    center = world.uniform(0.25, 0.75, (k, 2))
    rng = np.random.default_rng([seed, k, s, 1])
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    other = (labels + rng.integers(1, k, n)) % k
    w_other = rng.uniform(0.0, mix, n)
    yy, xx = (np.mgrid[0:s, 0:s].astype(np.float32) + 0.5) / s  # [S, S]
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    for a in range(0, n, 1024):
        b = min(n, a + 1024)
        m = b - a
        img = np.zeros((m, s, s, 3), dtype=np.float32)
        for cls, w in ((labels[a:b], 1.0 - w_other[a:b]), (other[a:b], w_other[a:b])):
            phase = rng.uniform(0.0, 2 * np.pi, (m, 2))
            for g in range(2):
                proj = xx[None] * np.cos(theta[cls, g])[:, None, None] + yy[None] * np.sin(theta[cls, g])[:, None, None]
                wave = np.sin(2 * np.pi * freq[cls, g][:, None, None] * proj + phase[:, g][:, None, None])
                img += (w[:, None, None, None] * wave[..., None] * color[cls, g][:, None, None, :]).astype(np.float32)
            c = center[cls] + rng.normal(0.0, 0.06, (m, 2))
            r2 = (xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2
            blob = np.exp(-r2 / (2 * 0.12**2))
            img += (w[:, None, None, None] * 1.5 * blob[..., None] * color[cls, 2][:, None, None, :]).astype(np.float32)
        contrast = rng.uniform(0.6, 1.2, (m, 1, 1, 1)).astype(np.float32)
        img = 0.5 + 0.16 * contrast * img + rng.normal(0.0, noise, img.shape).astype(np.float32)
        out[a:b] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, labels


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 handwritten digits (1797 images, 10 classes; ships with
    scikit-learn) as uint8 ``[1797, 8, 8, 1]`` (0..16 scaled to 0..240) and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the digits data ships with scikit-learn, which is not installed: pip install scikit-learn "
            '(or, in the kcd_fast checkout, pip install -e ".[bench]")',
            name=err.name,
        ) from None
    d = load_digits()
    images = (d.images * 15.0).round().clip(0, 255).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def split_arrays(
    images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A stratified train/test split: ``(train_images, train_labels, test_images, test_labels)``."""
    if not (is_finite_number(test_fraction) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng([seed, 7])
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        test.append(idx[: max(1, int(round(test_fraction * idx.size)))])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return images[mask], labels[mask], images[test_idx], labels[test_idx]


_NPZ_KEYS = {
    "train": (("x_train", "y_train"), ("train_images", "train_labels"), ("images", "labels"), ("x", "y")),
    "test": (("x_test", "y_test"), ("test_images", "test_labels")),
}


def load_arrays(
    path: str | Path, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads ``(train_images, train_labels, test_images, test_labels)`` (uint8 NHWC, int64).

    ``path`` is an ``.npz`` holding uint8 images ``[N, H, W, C]`` (or ``[N, H, W]``) and
    labels under ``images``/``labels`` (or ``x``/``y``, ``x_train``/``y_train``,
    ``train_images``/``train_labels``), with an optional test split under
    ``x_test``/``y_test`` or ``test_images``/``test_labels``; or an image folder laid out
    as ``root/<class>/<image>`` (or ``root/train/<class>`` and ``root/test/<class>``), read
    with Pillow and resized to ``image_size``. Without a test split, a stratified
    ``test_fraction`` is held out.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix != ".npz":
            raise ValueError(f"data file must be an .npz (or pass an image folder), got {str(p)!r}")
        with np.load(p) as z:
            tr = next((ks for ks in _NPZ_KEYS["train"] if all(k in z for k in ks)), None)
            if tr is None:
                raise ValueError(f"{p} holds {sorted(z.files)}; expected images/labels (or x/y, x_train/y_train)")
            te = next((ks for ks in _NPZ_KEYS["test"] if all(k in z for k in ks)), None)
            arrays = [_check_images(z[tr[0]], f"{p}:{tr[0]}"), np.asarray(z[tr[1]]).astype(np.int64)]
            if te is not None:
                arrays += [_check_images(z[te[0]], f"{p}:{te[0]}"), np.asarray(z[te[1]]).astype(np.int64)]
        if len(arrays) == 4:
            return arrays[0], arrays[1], arrays[2], arrays[3]
        return split_arrays(arrays[0], arrays[1], test_fraction, seed)
    if (p / "train").is_dir() and (p / "test").is_dir():
        xtr, ytr = _read_folder(p / "train", image_size)
        xte, yte = _read_folder(p / "test", image_size, ImageFolder(p / "train").classes)
        return xtr, ytr, xte, yte
    x, y = _read_folder(p, image_size)
    return split_arrays(x, y, test_fraction, seed)


def _check_images(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{name} must be [N, H, W, C] or [N, H, W], got shape {x.shape}")
    return np.ascontiguousarray(x)


def _read_folder(root: Path, image_size: int, classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every image of the class-per-folder ``root`` (:class:`kcd_fast.ImageFolder`: its
    extension list and torchvision's order), decoded with :func:`kcd_fast.data.load_rgb`
    and resized to ``image_size`` squared (PIL bilinear): uint8 ``[N, S, S, 3]``, int64 ``[N]``.
    ``classes`` fixes the class order (a test split's must be the train split's)."""
    from PIL import Image

    folder = ImageFolder(root)
    index = folder.class_to_idx if classes is None else {c: j for j, c in enumerate(classes)}
    missing = sorted(set(folder.classes) - set(index))
    if missing:
        raise ValueError(f"image folder {str(root)!r} has classes {missing} that the training split lacks")
    xs = [np.asarray(load_rgb(path).resize((image_size, image_size), Image.BILINEAR)) for path, _ in folder.samples]
    ys = [index[folder.classes[t]] for _, t in folder.samples]
    return np.stack(xs).astype(np.uint8), np.asarray(ys, dtype=np.int64)
