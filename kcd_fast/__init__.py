"""kcd_fast: Knowledge Condensation Distillation that saves wall-clock time.

Core API (see README.md; the algorithm is docs/algorithm.md, the layout docs/architecture.md):
    kcd_fast.ops.observe_entropy / observe_kl / values / blend_   compiled kernels
    kcd_fast.condense                                              ranking + VAKS pairs
    kcd_fast.CondensationSchedule, kcd_fast.unix_computation       schedule, cost model
    kcd_fast.InfoBatchSchedule                                     InfoBatch's pruning rule (policies.py)
    kcd_fast.ValueBank                                             per-point accumulators
    kcd_fast.memory                                                cache of large CPU results
    kcd_fast.checkpoint, kcd_fast.distributed                      atomic checkpoints, DDP collectives
Data and loading:
    kcd_fast.ArrayDataset, kcd_fast.ImageFolder                    kcd_fast.data
    kcd_fast.KCDLoader, kcd_fast.KCDBatchSampler                   kcd_fast.loader
    kcd_fast.WithIndices                                           samples that carry their index
    kcd_fast.UnreadableSampleError                                 a sample no back end can read
Integrations: kcd_fast.integrations.lightning.KCDCallback, kcd_fast.integrations.hf.KCDTrainer.
KD trainer and models: kcd_fast.kd (``python -m kcd_fast.kd``; ``kcd_fast.train`` is an alias).
"""

from . import checkpoint, distributed, memory, ops
from ._ext import build_info, has_cuda
from ._version import __version__
from .bank import Measure, ValueBank
from .condense import Condensation, Pairing, Vaks, condense
from .data import ArrayDataset, ImageFolder, MissingSampleError, UnreadableSampleError, WithIndices
from .loader import KCDBatchSampler, KCDLoader
from .policies import InfoBatchSchedule
from .schedule import CondensationSchedule, Decay, unix_computation

__all__ = [
    "ArrayDataset",
    "Condensation",
    "CondensationSchedule",
    "Decay",
    "ImageFolder",
    "InfoBatchSchedule",
    "KCDBatchSampler",
    "KCDLoader",
    "Measure",
    "MissingSampleError",
    "Pairing",
    "UnreadableSampleError",
    "Vaks",
    "ValueBank",
    "WithIndices",
    "__version__",
    "build_info",
    "checkpoint",
    "condense",
    "distributed",
    "has_cuda",
    "memory",
    "ops",
    "unix_computation",
]
