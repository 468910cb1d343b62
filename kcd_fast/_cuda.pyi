"""CUDA kernels (csrc/bind_cuda.cpp): like kcd_fast._cpu on device capsules, enqueued on
`stream` (an integer cudaStream_t). errors: [2] int64 device counters {bad index, non-finite};
scratch: [>= B] float64, the rows' scores before they are added to the bank in row order."""

from typing import Any

Capsule = Any
__version__: str
cuda_archs: str

def observe_entropy(
    logits: Capsule, indices: Capsule, sums: Capsule, counts: Capsule, errors: Capsule, scratch: Capsule, stream: int
) -> None: ...
def observe_entropy_seq(
    logits: Capsule,
    mask: Capsule,
    indices: Capsule,
    sums: Capsule,
    counts: Capsule,
    errors: Capsule,
    scratch: Capsule,
    stream: int,
) -> None: ...
def observe_scores(
    scores: Capsule, indices: Capsule, sums: Capsule, counts: Capsule, errors: Capsule, scratch: Capsule, stream: int
) -> None: ...
def observe_kl(
    student: Capsule,
    teacher: Capsule,
    indices: Capsule,
    sums: Capsule,
    counts: Capsule,
    temperature: float,
    errors: Capsule,
    scratch: Capsule,
    stream: int,
    commit: bool = True,
) -> None: ...
def accumulate_rows(indices: Capsule, scratch: Capsule, sums: Capsule, counts: Capsule, stream: int) -> None: ...
def values(sums: Capsule, counts: Capsule, out: Capsule, period: float, alpha: float, stream: int) -> None: ...
def blend(images: Capsule, dst: Capsule, src: Capsule, eps: Capsule, errors: Capsule, stream: int) -> None: ...
def condense(
    values: Capsule,
    n_keep: int,
    n_prev: int,
    mode: int,
    eps_m: float,
    random_pos: Capsule,
    workspace: Capsule,
    keep: Capsule,
    dropped: Capsule,
    dst: Capsule,
    src: Capsule,
    eps: Capsule,
    stream: int,
) -> None: ...
def condense_workspace_bytes(n: int) -> int: ...
def device_count() -> int: ...
def has_primary_context(device: int) -> bool: ...
def set_variant(name: str, value: int) -> None: ...
