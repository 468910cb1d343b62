"""Knowledge distillation on top of kcd_fast: the trainer the benchmarks run.

- :mod:`.trainer`: :class:`KDTrainer` (one loop for vanilla KD and KCD, which differ only
  in the loader's schedule), :class:`KDConfig`, the KD loss, batch preprocessing;
- :mod:`.models`: CIFAR ResNets, a tiny ConvNet pair, an MLP pair, torchvision models;
- :mod:`.teacher`: teachers trained once and cached in a folder the caller names;
- :mod:`.data`: generated, shipped (scikit-learn's digits) and user-supplied arrays;
- :mod:`.cli`: ``python -m kcd_fast.kd`` (also ``python -m kcd_fast.train``).
"""

from .data import digits_arrays, load_arrays, split_arrays, synthetic_arrays
from .models import build_model, count_parameters
from .teacher import cached_teacher, dataset_fingerprint, default_cache_dir
from .trainer import (
    BatchPreprocess,
    EpochRecord,
    KDConfig,
    KDTrainer,
    LRIndex,
    LRSchedule,
    TrainResult,
    epoch_lr_factor,
    evaluate,
    full_schedule,
    kd_loss,
    keep_uint8,
    lr_factor,
    make_eval_loader,
    make_loader,
    train_data,
)

__all__ = [
    "BatchPreprocess",
    "EpochRecord",
    "KDConfig",
    "KDTrainer",
    "LRIndex",
    "LRSchedule",
    "TrainResult",
    "build_model",
    "cached_teacher",
    "default_cache_dir",
    "count_parameters",
    "dataset_fingerprint",
    "digits_arrays",
    "evaluate",
    "full_schedule",
    "kd_loss",
    "keep_uint8",
    "load_arrays",
    "epoch_lr_factor",
    "lr_factor",
    "make_eval_loader",
    "make_loader",
    "train_data",
    "split_arrays",
    "synthetic_arrays",
]
