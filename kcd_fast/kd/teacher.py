"""Teachers trained once and cached: keyed by the data, the model and the training setup."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._cache import default_cache_dir
from ..checkpoint import atomic_write
from .models import build_model
from .trainer import BatchPreprocess, KDConfig, KDTrainer, evaluate, make_eval_loader, make_loader

__all__ = ["cached_teacher", "dataset_fingerprint", "default_cache_dir"]


def dataset_fingerprint(images: Any, labels: Any) -> str:
    """SHA-256 of the image bytes, shape and labels (hex)."""
    h = hashlib.sha256()
    for name, arr in (("images", images), ("labels", labels)):
        t = arr if isinstance(arr, torch.Tensor) else torch.as_tensor(arr)
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cached_teacher(
    name: str,
    train_set: Any,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    config: KDConfig,
    epochs: int,
    preprocess: BatchPreprocess,
    batch_size: int = 128,
    test_set: Any = None,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained teacher, loaded from ``cache_dir`` when a checkpoint with the same key
    exists, else trained with cross-entropy (the KD trainer with ``alpha_kd = 0``) and saved.

    The key hashes the training images and labels (``train_set.images`` / ``.labels``, or
    ``.data`` / ``.targets``), the model name, classes, input shape, epochs, batch size,
    seed, ``config`` and ``preprocess``. ``cache_dir``: the folder of cached teachers (the
    caller chooses it: the command line's ``--cache-dir``, the benchmarks' own cache), or
    None to always train. A checkpoint is written atomically (:func:`kcd_fast.checkpoint.atomic_write`).

    Returns ``(teacher, info)``: the teacher in eval mode on ``device``, with
    ``info = {"cached": bool, "path": str | None, "key": str, "seconds": float,
    "accuracy": float | None}`` (test accuracy when ``test_set`` is given).
    """
    images = getattr(train_set, "images", getattr(train_set, "data", None))
    labels = getattr(train_set, "labels", getattr(train_set, "targets", None))
    if images is None or labels is None:
        raise ValueError(
            f"train_set must expose images and labels (.images/.labels or .data/.targets) to key the cache, "
            f"got {type(train_set).__name__}"
        )
    meta = {
        "name": name,
        "num_classes": num_classes,
        "input_shape": list(map(int, input_shape)),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "config": _jsonable(asdict(config)),
        "preprocess": preprocess.spec(),
        "data": dataset_fingerprint(images, labels),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    path = None if cache_dir is None else Path(cache_dir) / f"teacher-{name.replace(':', '_')}-{key[:16]}.pt"
    device = torch.device(device)
    teacher = build_model(name, num_classes, input_shape, seed=seed)
    if path is not None and path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("key") == key:
            teacher.load_state_dict(ckpt["state_dict"])
            teacher.to(device).eval()
            if log:
                log(f"teacher {name}: loaded {path} (accuracy {ckpt.get('accuracy')})")
            return teacher, {
                "cached": True,
                "path": str(path),
                "key": key,
                "seconds": 0.0,
                "accuracy": ckpt.get("accuracy"),
            }
    if log:
        log(f"teacher {name}: training for {epochs} epochs (cache miss)")
    loader = make_loader("kd", train_set, epochs=epochs, batch_size=batch_size, seed=seed)
    trainer = KDTrainer(
        teacher,
        None,
        loader,
        config,
        preprocess=preprocess,
        device=device,
        progress=progress,
        log=log,
        name=f"teacher {name}",
    )
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    accuracy = None
    if test_set is not None:
        accuracy = evaluate(teacher, make_eval_loader(test_set, batch_size=512), preprocess, device)
    teacher.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
        buf = io.BytesIO()
        torch.save({"key": key, "meta": json.dumps(meta), "state_dict": state, "accuracy": accuracy}, buf)
        atomic_write(path, buf.getvalue())
    if log:
        log(
            f"teacher {name}: trained in {seconds:.1f} s, accuracy "
            + ("n/a" if accuracy is None else f"{accuracy:.2f}%")
        )
    return teacher, {
        "cached": False,
        "path": None if path is None else str(path),
        "key": key,
        "seconds": seconds,
        "accuracy": accuracy,
    }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
