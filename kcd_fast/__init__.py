"""kcd_fast: Knowledge Condensation Distillation that saves wall-clock time.

Core API (see README.md and ../shared/KCD_SPEC.md):
    kcd_fast.ops.observe_entropy / observe_kl / values / blend_   compiled kernels
    kcd_fast.condense                                              ranking + VAKS pairs
    kcd_fast.CondensationSchedule, kcd_fast.unix_computation       schedule, cost model
    kcd_fast.ValueBank                                             per-point accumulators
    kcd_fast.memory                                                cache of large CPU results
"""

from . import memory, ops
from ._ext import build_info, has_cuda
from ._version import __version__
from .bank import Measure, ValueBank
from .condense import Condensation, Vaks, condense
from .datasets import ArrayDataset
from .image_folder import ImageFolder
from .loader import KCDLoader
from .schedule import CondensationSchedule, Decay, unix_computation

__all__ = [
    "ArrayDataset",
    "Condensation",
    "CondensationSchedule",
    "Decay",
    "ImageFolder",
    "KCDLoader",
    "Measure",
    "Vaks",
    "ValueBank",
    "__version__",
    "build_info",
    "condense",
    "has_cuda",
    "memory",
    "ops",
    "unix_computation",
]
