"""The loader's saved state: its schema and checks, the summary log, image digests.

A state (``KCDLoader.state_dict()``) is a dict of Python values and CPU tensors::

    format     "kcd_fast.KCDLoader/1"
    n          points in the dataset
    schedule   CondensationSchedule.state()
    config     LoaderConfig.state(): value, vaks, eps_m, alpha, temperature
    seed       the run's seed (every RNG stream derives from (seed, epoch))
    epoch      the epoch to run (or to continue)
    position   batches of that epoch trained (observed, kcd_fast.loader.progress) when the
               state was taken; all of them (the epoch's batch count) when it was taken after
               the epoch's last batch was trained but before the condensation that ends it
               (which then runs after the load); 0 at an epoch's start (absent in states of
               kcd_fast 0.1: 0)
    world_size the ranks the state was taken on (a mid-epoch state resumes only there)
    active     int64 [n_e] ascending: the points of that epoch
    bank       ValueBank.state_dict() (global totals under DDP)
    history    one dict per condensation
    summaries  the summary log: {"epoch", "dst" int64 [P], "src" int64 [P], "eps" float64 [P]}
               per condensation with pairs, in order
    digest     blake2b of the rows the summaries touched, after them (arrays), or None

The images themselves are not saved: a resume replays the summary log onto the ORIGINAL
images (:func:`prepare_array_replay`, or the DALI folder overlay) and checks the digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._checks import is_int
from ..ops import blend_

__all__ = [
    "STATE_FORMAT",
    "Summary",
    "blend_rows",
    "check_active",
    "check_bank_state",
    "check_position",
    "check_summaries",
    "images_digest",
    "is_prefix",
    "prepare_array_replay",
    "touched_rows",
]

STATE_FORMAT = "kcd_fast.KCDLoader/1"
REQUIRED = ("format", "n", "schedule", "config", "seed", "epoch", "active", "bank", "history", "summaries", "digest")

Summary = dict[str, Any]  # {"epoch": int, "dst": int64 [P], "src": int64 [P], "eps": float64 [P]} (CPU tensors)


def copy_summary(s: Summary) -> Summary:
    return {
        "epoch": int(s["epoch"]),
        "dst": s["dst"].cpu().clone(),
        "src": s["src"].cpu().clone(),
        "eps": s["eps"].cpu().clone(),
    }


def blend_rows(storage: torch.Tensor, s: Summary) -> None:
    """Applies summary ``s`` to ``storage`` ``[N, ...]`` uint8 with ``blend_``. A strided
    view (such as torchvision's transposed CIFAR ``.data``) is blended through a gathered
    copy of the ``2P`` rows involved, with the same result bit for bit."""
    dev = storage.device
    d, r, e = s["dst"].to(dev), s["src"].to(dev), s["eps"].to(dev, torch.float64)
    if storage.is_contiguous():
        blend_(storage, d, r, e, check=False)
        return
    p = d.shape[0]
    sub = storage[torch.cat([d, r])].contiguous()  # [2P, ...]
    pos = torch.arange(2 * p, device=dev)
    blend_(sub, pos[:p], pos[p:], e, check=False)
    storage[d] = sub[:p]


def touched_rows(summaries: list[Summary]) -> torch.Tensor:
    """``[U]`` int64, sorted: every point a summary wrote or read."""
    if not summaries:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(torch.cat([t for s in summaries for t in (s["dst"], s["src"])]))


def images_digest(rows: torch.Tensor, images: torch.Tensor) -> str:
    """blake2b of the row indices ``[U]`` and the images ``[U, ...]`` uint8."""
    h = hashlib.blake2b(digest_size=16)
    h.update(rows.cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(images.cpu().numpy()))
    return h.hexdigest()


def same_summary(a: Summary, b: Summary) -> bool:
    return a is b or (
        int(a["epoch"]) == int(b["epoch"])
        and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in ("dst", "src", "eps"))
    )


def is_prefix(applied: list[Summary], summaries: list[Summary]) -> bool:
    """True when ``applied`` is the start of ``summaries``."""
    k = len(applied)
    return k <= len(summaries) and all(same_summary(a, b) for a, b in zip(applied, summaries[:k], strict=True))


def check_summaries(summaries: Any, n: int) -> list[Summary]:
    """The state's summary log as CPU copies; ``ValueError`` for a malformed entry."""
    if not isinstance(summaries, list):
        raise ValueError(f"state summaries must be a list, got {type(summaries).__name__}")
    out = []
    for j, s in enumerate(summaries):
        try:
            d, r, e = s["dst"], s["src"], s["eps"]
            ok = (
                all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in (d, r, e))
                and d.dtype == r.dtype == torch.int64
                and e.dtype == torch.float64
                and d.shape == r.shape == e.shape
            )
            ok = ok and (
                d.numel() == 0
                or (int(torch.minimum(d.min(), r.min())) >= 0 and int(torch.maximum(d.max(), r.max())) < n)
            )
            ok = ok and isinstance(s["epoch"], (int, np.integer))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"state summaries[{j}] must hold int64 [P] dst / src in [0, {n}) and float64 [P] eps")
        out.append(copy_summary(s))
    return out


def check_position(
    state: dict[str, Any], n_batches: int, world_size: int, batches_at: Callable[[int], int] | None = None
) -> int:
    """The state's position in this loader's batches (0 when absent); ``ValueError`` unless
    it is an int in ``[0, n_batches]`` (``n_batches``: every batch of the epoch trained, its
    condensation not run yet) and, when > 0, the state was taken at this ``world_size``. A
    state with every batch of its epoch trained at its own world size (``batches_at(world)``:
    the epoch's batches per rank there) resumes at any world size: as ``n_batches``."""
    position = state.get("position", 0)
    saved_world = state.get("world_size", world_size)
    ok = isinstance(position, (int, np.integer)) and not isinstance(position, bool)
    if ok and position and saved_world != world_size and batches_at is not None and is_int(saved_world):
        if saved_world >= 1 and position == batches_at(int(saved_world)):
            return n_batches  # the epoch was complete there: it is complete here
    if not ok or not 0 <= position <= n_batches:
        raise ValueError(
            f"state position must be an int in [0, {n_batches}] (batches of the epoch trained), got {position!r}"
        )
    if position and saved_world != world_size:
        raise ValueError(
            f"the state was taken mid-epoch (after {position} batches) on {saved_world} rank(s) and resumes only at "
            f"that world size, this loader runs on {world_size}; save at an epoch's end or start to change the "
            "world size"
        )
    return int(position)


def check_active(active: Any, n: int, want: int, epoch: int) -> np.ndarray:
    """The state's active set as an int64 numpy copy; ``ValueError`` unless it is an
    int64 ``[want]`` tensor of ascending, unique points in ``[0, n)``."""
    if not (isinstance(active, torch.Tensor) and active.dtype == torch.int64 and active.shape == (want,)):
        got = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, torch.Tensor) else type(active).__name__
        raise ValueError(f"state active must be an int64 [{want}] tensor at epoch {epoch}, got {got}")
    act = active.cpu().numpy().astype(np.int64, copy=True)
    if act.size and (act[0] < 0 or act[-1] >= n or not (np.diff(act) > 0).all()):
        raise ValueError(f"state active must be ascending, unique points in [0, {n})")
    return act


def check_bank_state(bank: Any, expect: dict[str, Any]) -> None:
    """``ValueError`` / ``KeyError`` unless ``bank`` is a value bank state of ``expect["n"]``
    points whose recorded fields equal ``expect``'s."""
    if not isinstance(bank, dict):
        raise ValueError(f"state bank must be a dict, got {type(bank).__name__}")
    missing = [k for k in ("n", "measure", "sums", "counts", "random_draws") if k not in bank]
    if missing:
        raise KeyError(f"KCDLoader state's bank is missing {missing}")
    n = expect["n"]
    sums, counts = bank["sums"], bank["counts"]
    if sums is not None and not (
        isinstance(sums, torch.Tensor)
        and sums.dtype == torch.float64
        and sums.shape == (n,)
        and isinstance(counts, torch.Tensor)
        and counts.dtype == torch.int32
        and counts.shape == (n,)
    ):
        raise ValueError(f"state bank must hold float64 [{n}] sums and int32 [{n}] counts")
    for key, val in expect.items():
        if key in bank and bank[key] != val:
            raise ValueError(f"state bank has {key} = {bank[key]!r}, this loader's has {val!r}")


def prepare_array_replay(
    storage: torch.Tensor, applied: list[Summary], summaries: list[Summary], digest: Any
) -> Callable[[], bool]:
    """Replays the summaries of ``summaries`` after the ``applied`` prefix on a copy of the
    rows they touch, checks ``digest``, and returns the function that writes them into
    ``storage`` (it returns whether anything changed). Raises ``ValueError`` before
    anything changes when the replay does not reproduce ``digest``."""
    k = len(applied)
    if not summaries:
        return lambda: False
    rows = touched_rows(summaries)
    rows_dev = rows.to(storage.device)
    sub = storage[rows_dev].contiguous()  # [U, ...] copy
    for s in summaries[k:]:
        pos_d = torch.searchsorted(rows, s["dst"]).to(storage.device)
        pos_s = torch.searchsorted(rows, s["src"]).to(storage.device)
        blend_(sub, pos_d, pos_s, s["eps"].to(storage.device), check=False)
    if digest is not None and images_digest(rows, sub) != digest:
        raise ValueError(
            "after replaying the state's summaries, the images differ from those the state was saved "
            "with: this loader's dataset is not the ORIGINAL dataset (or it was already summarised by "
            "another loader); reload the original dataset and load the state into a new KCDLoader over it"
        )

    def commit() -> bool:
        if len(summaries) > k:
            storage[rows_dev] = sub
            return True
        return False

    return commit
