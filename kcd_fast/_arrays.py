"""Array plumbing at the Python boundary: any torch tensor, numpy array or DLPack array
(cupy, ...) becomes a zero-copy torch view for checking, kernels receive DLPack
capsules, and results go back in the caller's library on the caller's device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.utils.dlpack

ArrayLike = Any  # torch.Tensor | numpy.ndarray | any object with __dlpack__

TORCH = "torch"
NUMPY = "numpy"
DLPACK = "dlpack"


def as_torch(x: ArrayLike, name: str, writable: bool = False) -> tuple[torch.Tensor, str]:
    """A torch view of ``x`` (no copy) and the name of the library it came from. A read-only
    numpy input is copied when it is only read, and refused when the op writes into it
    (``writable``): writing into a hidden copy would lose the result."""
    if isinstance(x, torch.Tensor):
        return x, TORCH
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            if writable:
                raise ValueError(
                    f"{name} is a read-only numpy array, but the op updates it in place; pass a writeable array "
                    f"(e.g. {name}.copy(), or np.array({name}))"
                )
            x = x.copy()
        return torch.from_numpy(x), NUMPY
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return torch.from_dlpack(x), DLPACK
    raise TypeError(f"{name} must be a torch.Tensor, numpy.ndarray or DLPack array, got {type(x).__name__}")


def to_lib(t: torch.Tensor, lib: str, like: ArrayLike | None = None) -> ArrayLike:
    """``t`` returned in the caller's library (zero-copy)."""
    if lib == TORCH:
        return t
    if lib == NUMPY:
        return t.numpy()
    mod = type(like).__module__.split(".")[0] if like is not None else ""
    if mod == "cupy":
        import cupy

        return cupy.from_dlpack(t)
    return t


def order_back(*written: tuple[torch.Tensor, ArrayLike]) -> None:
    """After an in-place kernel on torch's current stream, for each ``(view, original)``
    whose original is a non-torch CUDA array: its own stream must not read before the kernel
    ends (DLPack ordered the producer's stream before ours on the way in; this is the way
    back). cupy: its current stream waits for an event recorded on ours (no host sync);
    another producer, whose stream is unknown: our stream is synchronised."""
    for t, original in written:
        if not t.is_cuda or isinstance(original, torch.Tensor):
            continue
        ours = torch.cuda.current_stream(t.device)
        if type(original).__module__.split(".")[0] == "cupy":
            import cupy

            with cupy.cuda.Device(t.device.index):
                done = cupy.cuda.Event(disable_timing=True)
                done.record(cupy.cuda.ExternalStream(ours.cuda_stream, t.device.index))
                cupy.cuda.get_current_stream().wait_event(done)
        else:
            ours.synchronize()


def capsule(t: torch.Tensor) -> Any:
    """A DLPack capsule of ``t`` without stream synchronisation (kernels run on the
    current stream, passed explicitly)."""
    return torch.utils.dlpack.to_dlpack(t)


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        hint = " (convert with .long())" if allowed == (torch.int64,) and not t.dtype.is_floating_point else ""
        raise TypeError(f"{name} must have dtype {names}, got {dtype_name(t)}{hint}")


def check_ndim(t: torch.Tensor, name: str, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")


def check_same_device(pairs: list[tuple[str, torch.Tensor]]) -> torch.device:
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; pass them on one device")
    if first.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{first_name} is on {first.device}; kcd_fast supports cpu and cuda tensors")
    return first.device


def check_contiguous_out(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous, got strides {t.stride()}")


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose rows are contiguous (row stride may be larger than C)."""
    if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    return t.contiguous()
