"""The NVIDIA DALI back end of :class:`kcd_fast.KCDLoader` (``backend="dali"``).

Like every back end it only moves and transforms samples: the core plans each epoch as a
list of index batches (the surviving points, in the epoch's order) and this back end
reads, decodes and augments exactly those points, in that order, in a DALI pipeline.

Sources
    - arrays: :class:`kcd_fast.ArrayDataset` or a torchvision-style dataset with a uint8
      ``.data`` ``[N, H, W(, C)]`` and ``.targets``. Each batch is gathered from the live
      store (``images[batch]``), so a summary the core blended into the store (VAKS,
      ``kcd_fast.ops.blend_``) is what the next epoch reads. A store on a GPU is fed to a
      GPU pipeline without leaving the device.
    - image folders: :class:`kcd_fast.ImageFolder`, torchvision's ``ImageFolder`` /
      ``DatasetFolder``, or anything with ``.samples`` ``[(path, class), ...]``. Each batch
      feeds the file paths; ``fn.io.file.read`` reads the bytes on DALI's threads and
      ``fn.decoders.image`` decodes them (``"cpu"`` without a GPU, ``"mixed"`` with one).

Epoch feeding (why one pipeline per epoch)
    ``epoch_batches(batches, seed)`` builds a fresh pipeline whose only input is a
    batch-mode ``fn.external_source`` (``batch=True, batch_info=True``): the callable
    returns batch ``info.iteration`` of the plan and raises ``StopIteration`` after the
    last one. Batch mode allows a smaller final batch (the pipeline's ``batch_size`` is the
    maximum), so with ``drop_last=False`` the last partial batch is delivered. DALI's
    pitfalls do not arise: the plan of an epoch is fixed before its pipeline exists, so
    prefetching can never read another epoch's list; no ``reset()`` is ever called (an
    epoch abandoned early is simply dropped with its pipeline); and every random operator
    is seeded from the pipeline seed, which is derived from the core's per-epoch seed
    ``(seed, epoch)``. So an epoch's augmentations are a function of ``(seed, epoch)`` and
    the plan alone: independent of threads, prefetch depth, earlier epochs and resumes.
    Building a CPU pipeline takes a few milliseconds (GPU: more, once per epoch).

    Worked example, 10 surviving points, ``batch_size=4``::

        plan (drop_last=False): [o0 o1 o2 o3] [o4 o5 o6 o7] [o8 o9]
        source(iteration 0, 1, 2) -> 4, 4, 2 samples; source(iteration 3) -> StopIteration
        yielded: 3 batches of 4, 4, 2 images; 10 reads (each point once)
        plan (drop_last=True):  [o0 o1 o2 o3] [o4 o5 o6 o7]   (8 reads; o8, o9 not read)

Reads
    Exactly one read per planned point per epoch: the source hands each point once to
    ``fn.io.file.read`` (or hands its overlay image, below); nothing else touches the
    files while an epoch runs (the overlay, below, reads the images of a condensation's
    pairs once, before the next epoch's pipeline starts). ``reads`` counts, for the
    current (last) epoch, the points handed to DALI by kind.

Augmentation (``augment``)
    ``None`` / ``"none"``: float32 ``[B, C, H, W]`` in [0, 1] (``x / 255``; for arrays bit
    for bit what ``ArrayDataset`` without a transform yields). ``"cifar"``: pad 4 (zeros),
    random crop back to ``H x W`` (32 x 32 for folders), horizontal flip with p = 0.5,
    normalize with the CIFAR-100 mean / std. ``"imagenet"``: random resized crop to
    224 x 224 (area [0.08, 1], aspect [3/4, 4/3]; fused with decoding for files), flip,
    normalize with the ImageNet mean / std. ``"cifar_eval"`` / ``"imagenet_eval"``: the
    evaluation versions (normalize only; resize shorter side to 256 and center crop 224).
    A callable ``augment(images, device) -> DataNode`` gets the decoded uint8 ``HWC``
    images on ``device`` (``"cpu"`` / ``"gpu"``) and returns the output node (its random
    operators are seeded by the pipeline like the recipes'). ``"auto"`` (default): ``None``
    for arrays, ``"imagenet"`` for image folders. Outputs are float32 ``[B, C, h, w]``.

VAKS
    Arrays are blended in place in their store (:class:`kcd_fast.loader.backends.base.ArrayImages`)
    and read live. Image folders get an overlay of summarised images
    (:mod:`kcd_fast.loader.backends.dali_overlay`): a summarised point is fed its overlay
    bytes instead of its path (a per-sample DALI conditional picks ``fn.io.file.read`` or
    the overlay), or, with ``overlay_dir``, the path of its overlay file; both go through
    the one decoder: still exactly one read and one decode per point. The overlay follows
    the summaries pushed by the core (``apply_summary``) lazily, at the start of the next
    epoch, and is rebuilt from the ORIGINAL files on resume.

GPU
    ``device_id="auto"`` uses the current CUDA device when torch sees one, else runs on
    the CPU (``device_id=None``). On a GPU, files are decoded with ``device="mixed"``
    (nvJPEG; PNM/PNG overlay images fall back to DALI's CPU decoder inside the op), the
    recipes run on the GPU, and the images come out as torch CUDA tensors through DLPack
    without a copy (the exchange orders DALI's stream before torch's current one). The
    DLPack capsule holds a reference to DALI's buffer, so a batch stays valid for as long
    as the caller holds it, after the epoch's end, an error or ``close()`` too (tested
    with freed memory poisoned).
    Labels stay on the CPU (a GPU store's stay on its GPU, like ``ArrayDataset``'s).
    With torchcodec installed, a folder's VAKS pairs are summarised on the same GPU too
    (:class:`FolderOverlay` ``device``: nvJPEG decoding and encoding in batches, torch's
    antialiased resize, the CUDA blend kernel); without it, on the CPU's threads.

Errors
    A missing, special (FIFO, socket, device, directory), unreadable or undecodable image
    file raises :class:`kcd_fast.UnreadableSampleError` (``MissingSampleError``, a
    ``FileNotFoundError``, when missing) naming the file, the dataset index and the reason,
    when the batch holding it is requested. Each file is checked with ``stat`` to be a
    regular, readable file just before its batch is handed to DALI (whose reader would block
    forever opening a FIFO); a bad one is replaced by an empty stand-in and its batch raises.
    A file the decoder refuses raises when DALI fails (DALI's own message, chained, does not
    always name the file: the back end checks the batches DALI held at the failure).
    Without DALI installed, constructing the back end raises ``ImportError`` saying
    ``pip install nvidia-dali-cuda130``.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from enum import Enum, unique
from typing import Any

import numpy as np
import torch

from ...data.errors import MissingSampleError, UnreadableSampleError, check_regular, sample_error
from ...data.folders import is_image_folder, load_rgb
from ..state import Summary
from .base import ArrayImages, EpochBatchSampler, Restore, check_prefix
from .dali_overlay import FolderOverlay, OverlayFormat
from .image_codec import torchcodec_module
from .recipes import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DALI_PACKAGE", "Augment", "DaliBackend", "OverlayFormat", "require_dali"]

DALI_PACKAGE = "nvidia-dali-cuda130"


_EMPTY = np.zeros(0, dtype=np.uint8)

# Pipelines alive in this process. A forked child (a DataLoader worker, multiprocessing's
# "fork") inherits them without their threads, and destroying one there waits forever for
# those threads; the child keeps them referenced instead, so that it never destroys them.
_LIVE_PIPELINES: weakref.WeakSet[Any] = weakref.WeakSet()
_KEPT_IN_CHILD: list[Any] = []


def _keep_inherited_pipelines() -> None:
    _KEPT_IN_CHILD.extend(_LIVE_PIPELINES)


os.register_at_fork(after_in_child=_keep_inherited_pipelines)


def require_dali() -> None:
    """Imports NVIDIA DALI or raises ``ImportError`` naming the package to install."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ImportError(f"backend='dali' needs NVIDIA DALI: pip install {DALI_PACKAGE}") from None


@unique
class Augment(str, Enum):
    """Built-in DALI augmentation recipes (see the module docstring)."""

    NONE = "none"
    CIFAR = "cifar"
    CIFAR_EVAL = "cifar_eval"
    IMAGENET = "imagenet"
    IMAGENET_EVAL = "imagenet_eval"


def _device_id_arg(device_id: Any) -> int | None:
    """``device_id`` (KCDLoader: ``dali_device``) -> a CUDA device index, or None for the CPU."""
    name = "device_id (KCDLoader: dali_device)"
    accepted = "'auto', None, 'cpu', 'cuda', 'cuda:K' or an int K >= 0"
    if device_id == "auto":
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device_id is None or device_id == "cpu":
        return None
    if isinstance(device_id, str) and (device_id == "cuda" or device_id.startswith("cuda:")):
        tail = device_id[5:]
        if tail and not tail.isdigit():
            raise ValueError(f"{name} must be {accepted}, got {device_id!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device_id!r} but torch sees no CUDA device; pass None or 'cpu' for the CPU")
        device_id = int(tail) if tail else torch.cuda.current_device()
    if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)) or device_id < 0:
        raise ValueError(f"{name} must be {accepted}, got {device_id!r}")
    if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
        raise ValueError(
            f"{name}={device_id} but torch sees {torch.cuda.device_count()} CUDA device(s); pass None or 'cpu' "
            "to run DALI on the CPU"
        )
    return int(device_id)


def _parse_augment(augment: Any, kind: str) -> Augment | Callable[..., Any]:
    if augment == "auto":
        return Augment.NONE if kind == "arrays" else Augment.IMAGENET
    if augment is None:
        return Augment.NONE
    if isinstance(augment, Augment):
        return augment
    if isinstance(augment, str):
        try:
            return Augment(augment)
        except ValueError:
            choices = ", ".join(repr(a.value) for a in Augment)
            raise ValueError(
                f"augment must be 'auto', None, one of {choices} or a callable "
                f"augment(images, device) -> DataNode, got {augment!r}"
            ) from None
    if callable(augment):
        return augment
    raise TypeError(f"augment must be 'auto', None, a recipe name or a callable, got {type(augment).__name__}")


def _dali_seed(seed: int) -> int:
    """A 31-bit DALI pipeline seed from the core's per-epoch 63-bit seed."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0] >> np.uint32(1))


class _Feed:
    """The external source of one epoch: batch ``info.iteration`` of the plan as DALI
    inputs, ``StopIteration`` after the last; counts what it hands out."""

    def __init__(self, batches: list[np.ndarray], make: Callable[[np.ndarray, dict[str, int], list], Any]):
        self.batches = batches
        self.make = make
        self.handed = 0  # batches handed to DALI so far
        self.counts = {"points": 0, "files": 0, "overlay": 0, "arrays": 0}
        # batch -> the first file of it that is not a regular, readable file (handed to DALI
        # as an empty stand-in; the batch raises the error when it is requested)
        self.errors: dict[int, UnreadableSampleError] = {}

    def __call__(self, info: Any) -> Any:
        k = info.iteration
        if k >= len(self.batches):
            raise StopIteration
        errors: list[UnreadableSampleError] = []
        out = self.make(self.batches[k], self.counts, errors)
        if errors:
            self.errors[k] = errors[0]
        self.counts["points"] += int(self.batches[k].shape[0])
        self.handed = k + 1
        return out


class DaliBackend:
    """KCDLoader's DALI back end (see the module docstring for the design).

    Args:
        dataset: an array dataset (pass its ``storage``) or an image folder (``.samples``).
        storage: the uint8 ``[N, H, W(, C)]`` store of an array dataset (a torch view, as
            ``kcd_fast.data.image_storage`` returns it), or None for a folder.
        batch_size: the largest batch (the pipeline's ``batch_size``), int >= 1.
        num_threads: DALI CPU threads (KCDLoader passes ``max(1, num_workers)``).
        device_id: ``"auto"`` (current CUDA device if torch sees one, else CPU), ``None`` or
            ``"cpu"`` (CPU only), ``"cuda"`` (the current CUDA device), ``"cuda:K"`` or an int K.
        augment: ``"auto"``, ``None``, a recipe name (:class:`Augment`) or a callable
            ``augment(images, device) -> DataNode``.
        prefetch_queue_depth: batches DALI prepares ahead (>= 1).
        overlay_format: ``"pnm"`` (default), ``"png"`` or ``"jpeg"`` (:class:`OverlayFormat`;
            ``KCDLoader``'s ``dali_overlay_format`` defaults to ``"jpeg"``).
        pin_memory: pin CPU image batches (when torch sees CUDA).
        overlay_dir: None (default: the folder overlay in memory) or a directory (made if
            missing) holding the overlay's content-addressed files (``kcd-overlay-<key>``:
            reused on resume, split between ranks that share it; :class:`FolderOverlay`).
        overlay_budget: bytes the in-memory overlay may hold (default 1 GiB); past it, summarised
            images go to files in a private temporary directory the overlay owns.
        overlay_device: where a folder's VAKS pairs are summarised: ``"auto"`` (on the GPU when
            DALI runs there and torchcodec is installed, else the CPU threads), ``"cpu"`` or
            ``"gpu"`` (refused without a GPU device or torchcodec).

    ``epoch_batches(batches, seed)`` yields ``(images, labels)`` per planned batch:
    images float32 ``[b, C, h, w]`` (CPU, or CUDA on a GPU), labels int64 ``[b]``.
    """

    name = "dali"

    def __init__(
        self,
        dataset: Any,
        *,
        storage: torch.Tensor | None = None,
        batch_size: int,
        num_threads: int = 1,
        device_id: int | str | None = "auto",
        augment: Any = "auto",
        prefetch_queue_depth: int = 2,
        overlay_format: str | OverlayFormat = "pnm",
        pin_memory: bool = False,
        overlay_dir: str | os.PathLike | None = None,
        overlay_budget: int = 1 << 30,
        overlay_device: str = "auto",
    ):
        require_dali()
        for name, value in (
            ("batch_size", batch_size),
            ("num_threads", num_threads),
            ("prefetch_queue_depth", prefetch_queue_depth),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        device_id = _device_id_arg(device_id)
        if overlay_device not in ("auto", "cpu", "gpu"):
            raise ValueError(
                "overlay_device (KCDLoader: dali_overlay_device) must be 'auto', 'cpu' or 'gpu', "
                f"got {overlay_device!r}"
            )
        if overlay_device == "gpu" and (device_id is None or torchcodec_module() is None):
            why = "DALI runs on the CPU (dali_device)" if device_id is None else "torchcodec is not installed"
            raise ValueError(f"overlay_device (KCDLoader: dali_overlay_device)='gpu' but {why}; pass 'auto' or 'cpu'")
        try:
            OverlayFormat(overlay_format.value if isinstance(overlay_format, OverlayFormat) else overlay_format)
        except ValueError:
            raise ValueError(
                "overlay_format (KCDLoader: dali_overlay_format) must be 'pnm', 'png' or 'jpeg', "
                f"got {overlay_format!r}"
            ) from None
        if overlay_dir is not None and not isinstance(overlay_dir, (str, os.PathLike)):
            raise TypeError(
                f"overlay_dir (KCDLoader: dali_overlay_dir) must be a directory path or None, got "
                f"{type(overlay_dir).__name__}"
            )
        if overlay_dir is not None and storage is not None:
            raise ValueError(
                f"overlay_dir applies to image folders (arrays are summarised in place), got "
                f"overlay_dir={os.fspath(overlay_dir)!r} with an array dataset"
            )

        self.dataset = dataset
        self.n = len(dataset)
        if storage is not None:
            self._init_arrays(dataset, storage)
        elif is_image_folder(dataset):
            self._init_files(dataset)
        else:
            raise TypeError(
                f"backend='dali' reads kcd_fast.ArrayDataset, torchvision-style datasets with a uint8 `.data` "
                f"array and `.targets`, or image folders with `.samples` [(path, class), ...] "
                f"(kcd_fast.ImageFolder, torchvision ImageFolder); got {type(dataset).__name__}: use backend='torch'"
            )
        if getattr(dataset, "transform", None) is not None:
            warnings.warn(
                f"{type(dataset).__name__}.transform is a torch-side transform; backend='dali' does not "
                "call it and applies its `augment` recipe in the pipeline instead",
                UserWarning,
                stacklevel=3,
            )
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.device_id: int | None = device_id
        self.augment = _parse_augment(augment, self.kind)
        channels = 1 if storage is not None and (storage.dim() == 3 or storage.shape[3] == 1) else 3
        if channels != 3 and augment in ("cifar", "cifar_eval", "imagenet", "imagenet_eval"):
            raise ValueError(
                f"augment={augment!r} normalises 3 channels, but the images are single-channel "
                f"{tuple(storage.shape)}; use augment=None or a callable recipe"
            )
        self.prefetch_queue_depth = int(prefetch_queue_depth)
        self.pin_memory = bool(pin_memory)
        self.sampler = EpochBatchSampler()
        self.reads: dict[str, int] = {"points": 0, "files": 0, "overlay": 0, "arrays": 0}
        # what summaries apply to: the store (arrays) or the overlay (folders), whose log is `_log`
        self._arrays = ArrayImages(storage) if storage is not None else None
        self._overlay = (
            None
            if self.kind == "arrays"
            else FolderOverlay(
                self._paths,
                overlay_format=overlay_format,
                num_threads=self.num_threads,
                overlay_dir=overlay_dir,
                budget=overlay_budget,
                # "auto": summarised where the pipeline runs, on its GPU when torchcodec can decode there
                device=None
                if overlay_device == "cpu" or device_id is None or torchcodec_module() is None
                else torch.device("cuda", device_id),
            )
        )
        self._log: list[Summary] = []
        self._iter: Iterator[Any] | None = None

    # -- sources ---------------------------------------------------------------------------
    def _init_arrays(self, dataset: Any, storage: torch.Tensor) -> None:
        if not isinstance(storage, torch.Tensor) or storage.dtype != torch.uint8 or storage.dim() not in (3, 4):
            got = f"{storage.dtype} {tuple(storage.shape)}" if isinstance(storage, torch.Tensor) else type(storage)
            raise ValueError(f"storage must be a uint8 [N, H, W] or [N, H, W, C] torch tensor, got {got}")
        if storage.shape[0] != self.n:
            raise ValueError(f"storage has {storage.shape[0]} rows but the dataset has {self.n} points")
        if storage.dim() == 4 and storage.shape[3] not in (1, 3):
            raise ValueError(f"backend='dali' reads [N, H, W, C] images with C = 1 or 3, got {tuple(storage.shape)}")
        labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = getattr(dataset, "targets", None)
        if labels is None:
            raise TypeError(f"{type(dataset).__name__} has images but neither `.labels` nor `.targets`")
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.shape != (self.n,) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be [N = {self.n}] integers, got {lab.dtype} {lab.shape}")
        self.kind = "arrays"
        self._storage = storage
        self._labels = lab.astype(np.int64)
        # labels of a GPU store stay on its device (ArrayDataset's are already there)
        self._labels_dev = (
            torch.as_tensor(self._labels, device=storage.device) if storage.device.type == "cuda" else None
        )
        self._hw = (int(storage.shape[1]), int(storage.shape[2]))
        self._channels = int(storage.shape[3]) if storage.dim() == 4 else 1

    def _init_files(self, dataset: Any) -> None:
        samples = dataset.samples
        if len(samples) != self.n:
            raise ValueError(f"{type(dataset).__name__}.samples has {len(samples)} entries, len(dataset) = {self.n}")
        paths, labels = [], []
        for j, s in enumerate(samples):
            if not (isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], (str, os.PathLike))):
                raise ValueError(f"{type(dataset).__name__}.samples[{j}] must be (path, class_index), got {s!r}")
            paths.append(os.fspath(s[0]))
            labels.append(int(s[1]))
        self.kind = "files"
        self._storage = None
        self._paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self._labels_dev = None
        self._hw = (32, 32)
        self._channels = 3

    def _array_batch(self, idx: np.ndarray, counts: dict[str, int], errors: list) -> tuple[Any, Any]:
        """Rows ``idx`` of the live store: ``[b, H, W, C]`` uint8 and ``[b]`` int64."""
        st = self._storage
        counts["arrays"] += int(idx.shape[0])
        if st.device.type == "cuda":
            rows = st[torch.as_tensor(idx, device=st.device)].contiguous()
            rows = rows.reshape(*rows.shape[:3], self._channels)
            if self.device_id is not None:  # stays on the GPU
                return rows, self._labels_dev[torch.as_tensor(idx, device=st.device)].contiguous()
            return rows.cpu().numpy(), self._labels[idx]
        rows = st[torch.from_numpy(idx)].contiguous().numpy()  # a copy of the current (summarised) rows
        return rows.reshape(*rows.shape[:3], self._channels), self._labels[idx]

    def _file_batch(self, overlay: dict[int, Any] | None) -> Callable[[np.ndarray, dict[str, int], list], Any]:
        labels = self._labels
        in_memory = overlay is not None and _has_bytes(overlay)

        def make(idx: np.ndarray, counts: dict[str, int], errors: list[UnreadableSampleError]) -> tuple[Any, ...]:
            ids = idx.tolist()
            paths = _checked_paths(self._paths, ids, overlay, errors)
            if overlay is None:
                counts["files"] += len(ids)
                return [np.frombuffer(os.fsencode(paths[i]), np.uint8) for i in ids], labels[idx]
            n_ov = sum(i in overlay for i in ids)
            counts["overlay"] += n_ov
            counts["files"] += len(ids) - n_ov
            # an overlay file (str) is read like an image file; encoded bytes are fed as they are
            files = [
                (overlay[i] if i in overlay else paths[i]) if isinstance(overlay.get(i, ""), str) else None for i in ids
            ]
            if not in_memory:  # overlay files only: a path either way
                return [np.frombuffer(os.fsencode(f), np.uint8) for f in files], labels[idx]
            return (
                [np.array(f is None) for f in files],
                [_EMPTY if f is None else np.frombuffer(os.fsencode(f), np.uint8) for f in files],
                [_EMPTY if f is not None else overlay[i] for i, f in zip(ids, files, strict=True)],
                labels[idx],
            )

        return make

    # -- the pipeline ----------------------------------------------------------------------
    def _build(self, feed: _Feed, seed: int, with_overlay: bool) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None
        dev = "gpu" if gpu else "cpu"
        recipe = self.augment

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=_dali_seed(seed),
            prefetch_queue_depth=self.prefetch_queue_depth,
            enable_conditionals=self.kind == "files",
        )
        def graph() -> Any:  # the DALI graph of one epoch
            if self.kind == "arrays":
                src_dev = "gpu" if gpu and self._storage.device.type == "cuda" else "cpu"
                images, labels = fn.external_source(
                    source=feed,
                    batch=True,
                    batch_info=True,
                    num_outputs=2,
                    device=src_dev,
                    layout=["HWC", ""],
                    ndim=[3, 0],
                    dtype=[types.UINT8, types.INT64],
                )
                if gpu and src_dev == "cpu":
                    images = images.gpu()
                return _augment_decoded(images, recipe, dev, self._hw), labels
            if with_overlay:
                is_overlay, paths, stored, labels = fn.external_source(
                    source=feed,
                    batch=True,
                    batch_info=True,
                    num_outputs=4,
                    ndim=[0, 1, 1, 0],
                    dtype=[types.BOOL, types.UINT8, types.UINT8, types.INT64],
                )
                if is_overlay:
                    encoded = stored
                else:
                    encoded = fn.io.file.read(paths)
            else:
                paths, labels = fn.external_source(
                    source=feed,
                    batch=True,
                    batch_info=True,
                    num_outputs=2,
                    ndim=[1, 0],
                    dtype=[types.UINT8, types.INT64],
                )
                encoded = fn.io.file.read(paths)
            # DALI's decoder can crash the process on bytes of no known format (seen with DALI
            # 2.4 on the CPU): such samples are decoded from a 1-pixel stand-in and flagged, and
            # the batch raises UnreadableImageError naming the file before it is yielded.
            known = _known_format(encoded)
            if known:
                data = encoded
            else:
                data = types.Constant(_STAND_IN, device="cpu")
            encoded = data
            decoder = "mixed" if gpu else "cpu"
            if recipe is Augment.IMAGENET:  # decode only a random crop, then resize (DALI's RN50 recipe)
                images = fn.decoders.image_random_crop(
                    encoded,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=[0.08, 1.0],
                    random_aspect_ratio=[3 / 4, 4 / 3],
                    num_attempts=10,
                )
                images = fn.resize(images, resize_x=224, resize_y=224)
                return _normalize(images, IMAGENET_MEAN, IMAGENET_STD, mirror=True), labels, known
            images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            return _augment_decoded(images, recipe, dev, self._hw), labels, known

        pipe = graph()
        pipe.build()
        _LIVE_PIPELINES.add(pipe)
        return pipe

    def epoch_batches(
        self, batches: list[np.ndarray], seed: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fresh pipeline over ``batches`` (int64 ``[b]`` arrays of dataset indices, in
        order); yields one ``(images, labels)`` per entry from ``start`` on. ``seed`` (the
        core's per-epoch seed) seeds every random operator. DALI's random operators keep
        their state inside the pipeline, so a resume at ``start > 0`` first runs the
        ``start`` batches before it and drops them (the same random numbers as an epoch
        run from its start, at the cost of those batches)."""
        self.close()
        self.sampler.set_batches(batches, seed, start)
        overlay: dict[int, np.ndarray] | None = None
        if self.kind == "files":
            self._overlay.sync(self._log)
            overlay = self._overlay.entries or None
            make = self._file_batch(overlay)
        else:
            make = self._array_batch
        feed = _Feed(batches, make)
        self.reads = feed.counts
        if not batches:
            return iter(())
        pipe = self._build(feed, seed, overlay is not None and _has_bytes(overlay))
        self._iter = self._run(pipe, feed, overlay or {}, start)
        return self._iter

    def _run(
        self, pipe: Any, feed: _Feed, overlay: dict[int, np.ndarray], start: int = 0
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(feed.batches)
        try:
            for k in range(n):
                try:
                    outs = pipe.run()
                except StopIteration:
                    raise RuntimeError(f"the DALI pipeline ended the epoch after {k} of {n} batches") from None
                except RuntimeError as err:
                    _raise_special(feed, k, err)
                    self._diagnose(feed, k, overlay, err)
                    raise
                _raise_special(feed, k)
                if self.kind == "files":
                    self._check_formats(outs[2], feed, k, overlay)
                    outs = outs[:2]
                if k >= start:  # batches before a mid-epoch resume point only advance the RNGs
                    yield self._to_torch(outs, feed.batches[k].shape[0])
        finally:
            del pipe  # abandoned or finished: the pipeline (and its threads) go with the generator

    def _check_formats(self, known: Any, feed: _Feed, k: int, overlay: dict[int, np.ndarray]) -> None:
        """Raises UnreadableImageError for the first sample of batch ``k`` whose bytes match
        no image format (decoded from the stand-in instead)."""
        flags = known.as_cpu() if hasattr(known, "as_cpu") else known
        ok = np.asarray(flags.as_tensor()).reshape(-1)  # [b] bool, one conversion per batch
        if ok.all():
            return
        i = int(feed.batches[k][int(np.flatnonzero(~ok)[0])])
        reason = (
            "cannot be decoded: its bytes are of no known image format (JPEG, PNG, BMP, PNM, TIFF, WebP, JPEG 2000)"
        )
        where = f"epoch batch {k}, backend='dali'"
        if i in overlay:
            raise UnreadableSampleError(
                f"its overlay image {reason} (dataset index {i}, {where})", index=i, reason=reason
            )
        raise sample_error(self._paths[i], reason, index=i, where=where)

    def _diagnose(self, feed: _Feed, k: int, overlay: dict[int, np.ndarray], err: Exception) -> None:
        """After a pipeline error at batch ``k``: find the file among the batches DALI held
        and raise an error naming it (chained to DALI's); return if none is found."""
        if self.kind != "files":
            raise RuntimeError(f"the DALI pipeline failed on batch {k} of the epoch: {err}") from err
        for j in range(k, max(feed.handed, k + 1)):
            for i in feed.batches[j].tolist():
                if i in overlay:
                    continue
                try:
                    load_rgb(self._paths[i])
                except UnreadableSampleError as bad:
                    raise sample_error(
                        self._paths[i],
                        bad.reason,
                        index=i,
                        where=f"epoch batch {j}, backend='dali'",
                        missing=isinstance(bad, MissingSampleError),
                    ) from err
        raise RuntimeError(
            f"the DALI pipeline failed on batch {k} of the epoch (every file of the batches it "
            f"held decodes with PIL): {err}"
        ) from err

    def _to_torch(self, outs: Any, b: int) -> tuple[torch.Tensor, ...]:
        res = []
        for j, out in enumerate(outs):
            if not out.is_dense_tensor():
                shapes = sorted({tuple(sh) for sh in out.shape()})[:4]
                raise RuntimeError(
                    f"the DALI pipeline's output {j} holds samples of different shapes ({shapes} ...): the images "
                    "of a batch must share one size; pick an augment recipe that crops or resizes to a fixed size"
                )
            t = out.as_tensor()
            # Zero-copy: the DLPack capsule owns a reference to DALI's buffer, which outlives
            # the pipeline (its end, an error, close()); tests/test_bad_data.py checks that held
            # batches stay intact after an error and close() with freed memory poisoned.
            if self.device_id is not None and type(t).__name__ == "TensorGPU":
                with torch.cuda.device(self.device_id):
                    x = torch.from_dlpack(t)
            else:
                x = torch.from_dlpack(t)
                if self.pin_memory and j == 0 and torch.cuda.is_available():
                    x = x.pin_memory()
            if x.shape[0] != b:
                raise RuntimeError(f"the DALI pipeline returned {x.shape[0]} samples for a batch of {b}")
            res.append(x)
        return tuple(res)

    # -- summaries -------------------------------------------------------------------------
    @property
    def images(self) -> torch.Tensor | None:
        """The uint8 store of an array dataset (None for a folder)."""
        return self._storage

    def apply_summary(self, summary: Summary) -> None:
        """Arrays: blended into the store now. Folders: the overlay takes it at the start of
        the next epoch (it is materialised once, with the next epoch's pipeline)."""
        if self._arrays is not None:
            self._arrays.apply(summary)
        else:
            self._log.append(summary)

    def prepare_restore(self, applied: list[Summary], summaries: list[Summary], digest: Any) -> Restore:
        if self._arrays is not None:
            commit_rows = self._arrays.prepare_restore(applied, summaries, digest)
            return lambda: commit_rows() and None  # arrays are read live: nothing else to do
        check_prefix(applied, summaries)

        def commit() -> None:
            self._log = list(summaries)  # the overlay is rebuilt from the files at the next epoch

        return commit

    def images_digest(self, summaries: list[Summary]) -> str | None:
        return self._arrays.digest(summaries) if self._arrays is not None else None

    def set_distributed(self, info: Any) -> None:
        """``info``: the loader's :class:`kcd_fast.distributed.DistInfo`; ranks that share
        ``overlay_dir`` split the work of each summary (:class:`FolderOverlay`)."""
        if self._overlay is not None:
            self._overlay.set_distributed(info)

    def sync_overlay(self, summaries: list[Summary] | None = None) -> None:
        """Brings the folder overlay in line with ``summaries`` (default: the summaries
        applied so far) now; see :meth:`FolderOverlay.sync`."""
        if self._overlay is None:
            return
        log = self._log if summaries is None else summaries
        self._overlay.sync(log)  # raises before anything changes
        self._log = list(log)

    def overlay_image(self, index: int) -> np.ndarray | None:
        """The summarised image of point ``index`` (uint8 ``[H, W, 3]``), or None when the
        point reads its original file (or the dataset is not a folder)."""
        return None if self._overlay is None else self._overlay.image(index)

    @property
    def overlay_points(self) -> list[int]:
        """Sorted indices of the points whose overlay image replaces their file."""
        return [] if self._overlay is None else self._overlay.points

    @property
    def overlay_nbytes(self) -> int:
        """Bytes the overlay holds (in memory, or in its files with ``overlay_dir``)."""
        return 0 if self._overlay is None else self._overlay.nbytes

    @property
    def overlay_stats(self) -> dict[str, Any]:
        """What the folder overlay did in this process: pairs materialised, summaries made and
        summaries reused from ``overlay_dir`` (a resumed loader reuses what an earlier one wrote),
        and ``device``: where pairs are summarised ("cpu threads", or the GPU's torch device)."""
        if self._overlay is None:
            return {}
        dev = self._overlay.device
        return {**self._overlay.stats, "device": "cpu threads" if dev is None else str(dev)}

    @property
    def overlay_dir(self) -> str | None:
        """The directory of the overlay files (``overlay_dir`` given, or the memory budget
        spilled), else None."""
        return None if self._overlay is None else self._overlay.directory

    def close(self) -> None:
        """Drops the current epoch's pipeline (the overlay stays)."""
        if self._iter is not None:
            close = getattr(self._iter, "close", None)
            if close is not None:
                close()
            self._iter = None


def _checked_paths(
    paths: list[str], ids: list[int], overlay: dict[int, Any] | None, errors: list[UnreadableSampleError]
) -> dict[int, str]:
    """index -> the path DALI reads for each point of ``ids`` that reads its original file:
    the file itself when it is a regular, readable file (one ``stat``), else an empty stand-in
    file, the error appended to ``errors`` (the batch raises it when it is requested: DALI's
    reader would block forever opening a FIFO)."""
    out = {}
    for i in ids:
        if overlay is not None and i in overlay:
            continue
        try:
            check_regular(paths[i], index=i)
            out[i] = paths[i]
        except UnreadableSampleError as err:
            errors.append(err)
            out[i] = _empty_file()
    return out


def _raise_special(feed: _Feed, k: int, cause: BaseException | None = None) -> None:
    """Raises the error of batch ``k``'s first file that was not a regular, readable file."""
    err = feed.errors.get(k)
    if err is not None:
        raise sample_error(
            err.path or "?",
            err.reason,
            index=err.index,
            where=f"epoch batch {k}, backend='dali'",
            missing=isinstance(err, MissingSampleError),
        ) from cause


_EMPTY_FILE: list[str] = []  # an empty regular file DALI reads in place of a special file


def _empty_file() -> str:
    if not (_EMPTY_FILE and os.path.isfile(_EMPTY_FILE[0])):
        fd, path = tempfile.mkstemp(prefix="kcd-empty-", suffix=".bin")
        os.close(fd)
        atexit.register(_remove_quietly, path)
        _EMPTY_FILE[:] = [path]
    return _EMPTY_FILE[0]


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _has_bytes(overlay: dict[int, Any]) -> bool:
    """Some overlay entries are encoded bytes in memory (not files): the pipeline takes them."""
    return any(not isinstance(v, str) for v in overlay.values())


# A 1 x 1 black PPM: decoded in place of bytes of no known format (then the batch raises).
_STAND_IN = np.frombuffer(b"P6\n1 1\n255\n\x00\x00\x00", np.uint8)


def _known_format(encoded: Any) -> Any:
    """Per sample, a DALI bool: ``encoded`` (1-D uint8) starts with the signature of a JPEG
    (FF D8 FF), PNG (89 'PNG'), BMP ('BM'), PNM ('P1'-'P6' and white space), TIFF ('II*\\0',
    'MM\\0*'), WebP ('RIFF' .... 'WEBP') or JPEG 2000 (a jP box or an FF 4F FF 51 codestream)."""
    from nvidia.dali import fn, types

    head = fn.pad(encoded, shape=[12], fill_value=0)  # shorter files are padded with zeros
    b = [fn.cast(head[i], dtype=types.INT32) for i in range(12)]

    def starts(*sig: int, at: int = 0) -> Any:
        out = b[at] == sig[0]
        for j, v in enumerate(sig[1:], start=at + 1):
            out = out & (b[j] == v)
        return out

    space = (b[2] == 0x20) | (b[2] == 0x09) | (b[2] == 0x0A) | (b[2] == 0x0D)
    return (
        starts(0xFF, 0xD8, 0xFF)  # JPEG
        | starts(0x89, 0x50, 0x4E, 0x47)  # PNG
        | starts(0x42, 0x4D)  # BMP
        | ((b[0] == 0x50) & (b[1] >= 0x31) & (b[1] <= 0x36) & space)  # PNM
        | starts(0x49, 0x49, 0x2A, 0x00)  # TIFF, little endian
        | starts(0x4D, 0x4D, 0x00, 0x2A)  # TIFF, big endian
        | (starts(0x52, 0x49, 0x46, 0x46) & starts(0x57, 0x45, 0x42, 0x50, at=8))  # WebP
        | starts(0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50)  # JPEG 2000, JP2 box
        | starts(0xFF, 0x4F, 0xFF, 0x51)  # JPEG 2000 codestream
    )


def _normalize(
    images: Any, mean: tuple[float, ...], std: tuple[float, ...], *, mirror: bool, crop: tuple[int, int] | None = None
) -> Any:
    """float32 CHW ``(x / 255 - mean) / std`` (optionally a random horizontal flip and a
    center crop)."""
    from nvidia.dali import fn, types

    kw: dict[str, Any] = {}
    if crop is not None:
        kw["crop"] = crop
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        mirror=fn.random.coin_flip(probability=0.5) if mirror else 0,
        **kw,
    )


def _augment_decoded(images: Any, recipe: Augment | Callable[..., Any], device: str, hw: tuple[int, int]) -> Any:
    """The recipe on decoded uint8 HWC ``images`` on ``device``; ``hw`` is the stored size
    of an array dataset (the CIFAR crop size; 32 x 32 for folders)."""
    from nvidia.dali import fn, types

    if not isinstance(recipe, Augment):
        from nvidia.dali.data_node import DataNode

        out = recipe(images, device)
        if not isinstance(out, DataNode):
            name = getattr(recipe, "__qualname__", None) or type(recipe).__name__
            raise TypeError(
                f"augment={name} must return the DALI DataNode of the augmented images (augment(images, device) -> "
                f"DataNode, built from fn.* operators), got {type(out).__name__}"
                + (" (did it forget to return?)" if out is None else "")
            )
        return out
    if recipe is Augment.NONE:  # x / 255 in float32, exactly as torch computes it
        return fn.transpose(fn.cast(images, dtype=types.FLOAT) / 255.0, perm=[2, 0, 1], output_layout="CHW")
    if recipe is Augment.CIFAR:
        h, w = hw
        padded = fn.crop(images, crop=(h + 8, w + 8), out_of_bounds_policy="pad", fill_values=0)  # 4 each side
        steps = [k / 8 for k in range(9)]  # anchor = pos * 8: uniform over the 9 integer offsets
        return fn.crop_mirror_normalize(
            padded,
            crop=(h, w),
            crop_pos_x=fn.random.uniform(values=steps),
            crop_pos_y=fn.random.uniform(values=steps),
            mirror=fn.random.coin_flip(probability=0.5),
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in CIFAR_MEAN],
            std=[255.0 * s for s in CIFAR_STD],
        )
    if recipe is Augment.CIFAR_EVAL:
        return _normalize(images, CIFAR_MEAN, CIFAR_STD, mirror=False)
    if recipe is Augment.IMAGENET:
        images = fn.random_resized_crop(
            images, size=[224, 224], random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10
        )
        return _normalize(images, IMAGENET_MEAN, IMAGENET_STD, mirror=True)
    images = fn.resize(images, resize_shorter=256)  # IMAGENET_EVAL
    return _normalize(images, IMAGENET_MEAN, IMAGENET_STD, mirror=False, crop=(224, 224))
