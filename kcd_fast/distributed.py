"""KCD under ``torch.distributed`` (DDP): collectives only.

:class:`kcd_fast.KCDLoader` stays one backend-agnostic core; this module holds the parts
that know about process groups, so that the core only calls them:

- :func:`resolve`: is the loader distributed, and which rank of how many (a process group
  initialised with ``torch.distributed.init_process_group``, or explicit arguments);
- :func:`shard_size` / :func:`shard_order`: ``torch.utils.data.DistributedSampler``'s rules
  applied to an epoch's global order (computed again every epoch, since the set shrinks);
- :func:`all_reduce_sum_`, :func:`agree`, :func:`all_ok`: the few collectives the loader
  and :class:`kcd_fast.ValueBank` need, on the device the group's backend can reduce
  (gloo: CPU tensors; nccl: CUDA tensors);
- :func:`handshake`: what the loader does before each of its collectives: every rank
  posts what it is about to do (an op tag, the epoch) in the process group's store and
  waits, at most ``collective_timeout`` seconds (default 300), for every other rank's
  post. Ranks that call different collectives (``save()`` on rank 0 alone, while rank 1
  condenses) raise :class:`CollectiveError` on every rank, naming the rule, instead of
  pairing the wrong all-reduces (a wrong file, a gloo abort); a rank that does not come
  (it raised and lives on, died, or runs other code) is named by the ranks that wait, once
  the bound has passed, instead of after the process group's timeout (30 minutes by
  default). Costs one store round trip per collective (a few per epoch).

Sharding, worked example (``DistributedSampler``'s rules; ``order`` is the epoch's global
order, the same on every rank because it depends only on ``(seed, epoch)``)::

    order = [7, 2, 9, 4, 0]  (n = 5), world_size = 2
    drop_last=False: per rank ceil(5 / 2) = 3; padded by wrapping the order:
                     [7, 2, 9, 4, 0, 7]; rank 0 -> [7, 9, 0], rank 1 -> [2, 4, 7]
                     (point 7 is visited, and observed, twice this epoch)
    drop_last=True:  per rank floor(5 / 2) = 2; the order is cut to [7, 2, 9, 4];
                     rank 0 -> [7, 9], rank 1 -> [2, 4] (point 0 is not visited)
    n < world_size (n = 1, world 3): drop_last=False pads [7, 7, 7], one point per rank;
                     drop_last=True gives every rank 0 points.

Checkpoint files (atomic, digest-checked) are :mod:`kcd_fast.checkpoint`; its
``save_checkpoint`` / ``load_checkpoint`` are re-exported here for code written against
kcd_fast 0.1. ``benchmarks/all_reduce.py`` times the per-condensation all-reduce.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._checks import check_opt_int
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_COLLECTIVE_TIMEOUT",
    "CollectiveError",
    "DistInfo",
    "agree",
    "all_ok",
    "all_reduce_sum_",
    "broadcast_int",
    "comm_device",
    "handshake",
    "load_checkpoint",
    "resolve",
    "save_checkpoint",
    "shard_order",
    "shard_size",
]


DEFAULT_COLLECTIVE_TIMEOUT = 300.0  # seconds a loader collective waits for the other ranks


# -- process group ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``enabled`` (shard epochs), ``rank`` in
    ``[0, world_size)``, the process ``group`` the value bank is all-reduced over (None:
    the default group), and ``timeout``: how many seconds the loader's collectives wait for
    the other ranks (None: the process group's own timeout)."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    group: Any = None
    timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT

    @property
    def communicates(self) -> bool:
        """True where collectives are needed (more than one rank)."""
        return self.enabled and self.world_size > 1


def is_initialized() -> bool:
    """A default process group exists."""
    return dist.is_available() and dist.is_initialized()


def check_timeout(value: Any) -> float | None:
    """``collective_timeout``: None or a finite number of seconds > 0."""
    ok = value is None or (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        raise ValueError(
            f"collective_timeout must be None (the process group's timeout) or a finite number of seconds > 0, "
            f"got {type(value).__name__} {value!r}"
        )
    return None if value is None else float(value)


def resolve(
    distributed: bool | None,
    rank: int | None = None,
    world_size: int | None = None,
    group: Any = None,
    collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT,
) -> DistInfo:
    """Decides whether (and how) a loader shards its epochs.

    Args:
        distributed: None (default): on when a process group is initialised (or any of
            ``rank`` / ``world_size`` / ``group`` is given); True: on, and fail clearly if
            that is impossible; False: off (every rank sees every point, nothing is reduced).
        rank, world_size: this process's rank and the number of ranks; default: those of
            ``group``. With an initialised group they must match it. Without one, only
            ``world_size=1`` is possible (the bank could not be all-reduced).
        group: the ``torch.distributed`` process group to shard over and all-reduce in
            (the data-parallel group); None: the default group.
        collective_timeout: seconds each of the loader's collectives waits for the other
            ranks (:func:`handshake`); None: the process group's timeout.

    Raises ``TypeError`` / ``ValueError`` naming the argument and the value.
    """
    timeout = check_timeout(collective_timeout)
    if distributed is not None and not isinstance(distributed, (bool, np.bool_)):
        raise TypeError(f"distributed must be None or a bool, got {type(distributed).__name__} {distributed!r}")
    rank = check_opt_int(rank, "rank")
    world_size = check_opt_int(world_size, "world_size")
    explicit = rank is not None or world_size is not None or group is not None
    if distributed is not None and not distributed:
        if explicit:
            raise ValueError(
                f"distributed=False shards nothing, but got rank={rank!r}, world_size={world_size!r}, "
                f"group={group!r}; drop them or pass distributed=True"
            )
        return DistInfo()
    initialised = is_initialized()
    if distributed is None and not explicit and not initialised:
        return DistInfo()
    if initialised:
        try:
            g_world, g_rank = dist.get_world_size(group), dist.get_rank(group)
        except (RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"group must be a torch.distributed process group or None, got {group!r}: {err}") from err
        if g_rank < 0:
            raise ValueError(f"this process is not a member of group {group!r}")
        if world_size is not None and world_size != g_world:
            raise ValueError(
                f"world_size={world_size} but the process group has {g_world} ranks; "
                "omit world_size or pass the data-parallel group"
            )
        if rank is not None and rank != g_rank:
            raise ValueError(f"rank={rank} but this process is rank {g_rank} of the process group; omit rank")
        return DistInfo(True, g_rank, g_world, group, timeout)
    if group is not None:
        raise ValueError(
            f"group={group!r} was given but no process group is initialised; "
            "call torch.distributed.init_process_group first"
        )
    if world_size is None or rank is None:
        raise ValueError(
            f"distributed=True needs an initialised process group (torch.distributed.init_process_group), "
            f"got none and rank={rank!r}, world_size={world_size!r}"
        )
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size > 1:
        raise ValueError(
            f"world_size={world_size} needs an initialised process group: the value bank is all-reduced at "
            "every condensation; call torch.distributed.init_process_group first"
        )
    return DistInfo(True, rank, world_size, None, timeout)


# -- sharding (DistributedSampler's rules) --------------------------------------------------
def shard_size(n: int, world_size: int, drop_last: bool) -> int:
    """Points each rank visits in an epoch of ``n`` points: ``ceil(n / world_size)``, or
    ``floor(n / world_size)`` with ``drop_last`` (exactly ``DistributedSampler``'s
    ``num_samples``)."""
    return n // world_size if drop_last else -(-n // world_size)


def shard_order(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """This rank's share of an epoch's global ``order``.

    Args:
        order: ``[n]`` int64, the epoch's global visiting order (same on every rank).
        rank, world_size: ``0 <= rank < world_size``.
        drop_last: cut the order to ``floor(n / world) * world`` points instead of padding.

    Returns ``[shard_size(n, world_size, drop_last)]`` int64: ``padded[rank::world_size]``,
    where ``padded`` is ``order`` wrapped around (repeatedly, when ``n < world_size``) to
    ``ceil(n / world) * world`` points, or cut with ``drop_last``. The union over ranks
    covers every point of ``order`` (without ``drop_last``); the padded points are
    visited twice.
    """
    n = int(order.shape[0])
    total = shard_size(n, world_size, drop_last) * world_size
    padded = np.resize(order, total) if total > n else order[:total]  # np.resize repeats the order
    return np.ascontiguousarray(padded[rank::world_size], dtype=np.int64)


# -- collectives ----------------------------------------------------------------------------
def comm_device(group: Any, device: torch.device | None) -> torch.device:
    """The device collectives over ``group`` run on: for an nccl group, ``device`` if it is
    a CUDA device, else the current CUDA device; otherwise (gloo, which reduces CPU and
    CUDA tensors, or a ``"cpu:gloo,cuda:nccl"`` group) ``device``, or the CPU when None."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return (
            device
            if device is not None and device.type == "cuda"
            else torch.device("cuda", torch.cuda.current_device())
        )
    return device if device is not None else torch.device("cpu")


def all_reduce_sum_(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Sums each tensor over the ranks of ``group``, in place. Tensors the group's backend
    cannot reduce where they live are reduced in a copy on :func:`comm_device` and copied
    back. Every rank receives the same reduced bits (the all-reduce ends by distributing
    one result); the order of the additions is the backend's and may differ between
    backends and world sizes."""
    for t in tensors:
        dev = comm_device(group, t.device)
        if dev == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        else:
            tmp = t.to(dev)
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM, group=group)
            t.copy_(tmp.to(t.device))


def _max_pair(a: int, b: int, group: Any, device: torch.device | None) -> tuple[int, int]:
    t = torch.tensor([a, b], dtype=torch.int64, device=comm_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t[0]), int(t[1])


def agree(digest: bytes, group: Any = None, what: str = "state", device: torch.device | None = None) -> None:
    """Collective: raises ``RuntimeError`` on every rank unless all ranks passed the same
    ``digest`` (compared through a 62-bit fingerprint: a MAX all-reduce of ``(h, -h)``)."""
    h = int.from_bytes(hashlib.blake2b(digest, digest_size=8).digest(), "little") >> 2
    hi, neg_lo = _max_pair(h, -h, group, device)
    if hi != h or -neg_lo != h:
        raise RuntimeError(
            f"the ranks disagree on the {what}: ranks must run the same dataset, schedule, seed, shuffle, "
            "batch_size, drop_last and KCD options, and load the same checkpoint"
        )


def broadcast_int(value: int, rank: int, group: Any = None, device: torch.device | None = None) -> int:
    """Collective: rank 0's ``value`` (an int in ``[0, 2**62)``) on every rank."""
    got, _ = _max_pair(int(value) if rank == 0 else -1, 0, group, device)
    return got


def all_ok(ok: bool, group: Any = None, device: torch.device | None = None) -> bool:
    """Collective (and a barrier): True where every rank passed ``ok=True``."""
    bad, _ = _max_pair(0 if ok else 1, 0, group, device)
    return bad == 0


# -- handshakes: every collective first agrees on what it is ---------------------------------
class CollectiveError(RuntimeError):
    """The ranks did not meet at the same loader collective (different ops or epochs), or a
    rank did not come within ``collective_timeout``. Raised on every rank that waits."""


RULE = (
    "the loader's collectives (iter() the first time, the condensation at each epoch's end, set_epoch(), "
    "state_dict(), save()) must be called on every rank, in the same order: call save() on every rank, and "
    "state_dict() too, not on rank 0 alone (rank 0 writes the file)"
)


@dataclass
class _Channel:
    """One process group's handshakes in this process: the store, the keys' prefix, the
    sequence number of the next handshake and, after a failure, why the ranks are out of step."""

    store: Any
    prefix: str
    seq: int = 0
    failed: str | None = None


# id(process group) -> (a weak reference to the group, its channel). Weak: a strong one would keep
# the group alive after destroy_process_group(), its gloo threads running into interpreter exit,
# where a thread releasing a finished collective's tensor aborts the process ("terminate called
# without an active exception"); a destroyed group's threads are joined.
_CHANNELS: dict[int, tuple[Any, _Channel]] = {}


def _channel(group: Any) -> _Channel | None:
    """The handshake channel of ``group`` (None: the default group); None where the store
    cannot be reached through torch's API (the collectives then run without handshakes)."""
    try:
        from torch.distributed import distributed_c10d as c10d

        pg = group if group is not None else c10d._get_default_group()
        got = _CHANNELS.get(id(pg))
        if got is not None and got[0]() is pg:
            return got[1]
        store, name = c10d._get_default_store(), c10d._get_process_group_name(pg)
    except (AttributeError, KeyError, ValueError, RuntimeError):
        return None
    ch = _Channel(store, f"kcd_fast/loader/{name}/")
    for key in [k for k, (ref, _) in _CHANNELS.items() if ref() is None]:
        del _CHANNELS[key]  # destroyed groups
    try:
        ref: Any = weakref.ref(pg)
    except TypeError:  # a group type without weak references: held strongly
        ref = lambda pg=pg: pg  # noqa: E731
    _CHANNELS[id(pg)] = (ref, ch)
    return ch


HEARTBEAT_SLICE = 1.0  # seconds a waiting rank waits between looks at the missing ranks' positions


def heartbeat(info: DistInfo, epoch: int, yielded: int) -> None:
    """Posts this rank's position (``yielded`` batches of ``epoch`` handed out) to the
    store, once per batch under DDP: a rank waiting at a mid-epoch :func:`handshake`
    (``state_dict()``, ``save()``) sees from it that a rank went on past that point instead
    of calling it (rank 0 alone saving while the others train on) and raises within about
    :data:`HEARTBEAT_SLICE` seconds rather than at the timeout. One store write per batch."""
    if not info.communicates:
        return
    ch = _channel(info.group)
    if ch is None or ch.failed is not None:
        return
    try:
        # with the number of handshakes this rank has done: a position posted before the
        # handshake a peer waits at (another loader on the group, an earlier stage) proves nothing
        ch.store.set(f"{ch.prefix}at/{info.rank}", f"{ch.seq}|{int(epoch)}|{int(yielded)}")
    except RuntimeError:
        pass  # the store failed: the next handshake says so


def _positions(ch: _Channel, ranks: list[int], seq: int) -> dict[int, tuple[int, int]]:
    """The last posted position ``(epoch, batches yielded)`` of each of ``ranks`` that posted
    one since its ``seq``-th handshake (the one this rank waits at)."""
    out = {}
    for r in ranks:
        key = f"{ch.prefix}at/{r}"
        if ch.store.check([key]):
            s, e, k = (int(v) for v in ch.store.get(key).decode().split("|"))
            if s == seq:
                out[r] = (e, k)
    return out


def handshake(info: DistInfo, op: str, epoch: int, what: str, position: tuple[int, int] | None = None) -> None:
    """Collective (a no-op on one rank): before a loader collective, every rank posts
    ``op`` and ``epoch`` (``what`` describes it in messages, e.g. "save() at epoch 3") and
    waits for every other rank's post, at most ``info.timeout`` seconds.

    Raises :class:`CollectiveError` on every rank when the posts differ (naming each rank's
    op and :data:`RULE`), and on a waiting rank when a rank did not post in time (naming
    it); then every later handshake of this process group raises too (the ranks are out of
    step: restart from the last checkpoint). A rank that gives up waiting replaces its post
    with an "abandoned" one, so a late rank raises instead of entering a collective alone.

    ``position`` (``(epoch, batches yielded)``, for a collective called mid-epoch): a
    missing rank whose :func:`heartbeat` shows it went past that point will not come (the
    ranks call the loader's collectives at the same point), so the waiting rank raises
    after at most about :data:`HEARTBEAT_SLICE` seconds."""
    if not info.communicates:
        return
    ch = _channel(info.group)
    if ch is None:
        return
    if ch.failed is not None:
        raise CollectiveError(
            f"KCDLoader: {what} refused: an earlier collective of the loaders on this process group failed and "
            f"the ranks are out of step (restart from the last checkpoint): {ch.failed}"
        )
    seq, ch.seq = ch.seq, ch.seq + 1
    mine = f"{ch.prefix}{seq}/{info.rank}"
    peers = {r: f"{ch.prefix}{seq}/{r}" for r in range(info.world_size) if r != info.rank}
    header = f"{op}|{epoch}|{what}"
    try:
        ch.store.set(mine, header)
        wait = timedelta(seconds=info.timeout) if info.timeout is not None else ch.store.timeout
        deadline = time.monotonic() + wait.total_seconds()
        while True:
            left = deadline - time.monotonic()
            step = min(left, HEARTBEAT_SLICE) if position is not None else left
            try:
                ch.store.wait(list(peers.values()), timedelta(seconds=max(step, 0.001)))
                break
            except RuntimeError:
                missing = [r for r, key in peers.items() if not ch.store.check([key])]
                if not missing:
                    break  # the last post came as the wait timed out
                past = {}
                if position is not None:
                    past = {r: at for r, at in _positions(ch, missing, seq).items() if at > position}
                gone = sorted(past)
                if not gone and time.monotonic() < deadline:
                    continue
                reason = f"went on past {what}" if gone else f"did not reach {what}"
                ch.store.set(mine, f"abandoned|{epoch}|gave up waiting for rank(s) {gone or missing} in {what}")
                if gone:
                    at = ", ".join(f"rank {r} at batch {k} of epoch {e}" for r, (e, k) in past.items())
                    raise CollectiveError(
                        f"KCDLoader: rank(s) {gone} {reason} (rank {info.rank} called it after batch {position[1]} of "
                        f"epoch {position[0]}; {at}): they did not call it; {RULE}"
                    ) from None
                bound = (
                    f"{info.timeout:g} s (collective_timeout)" if info.timeout is not None else f"{wait} (the group's)"
                )
                raise CollectiveError(
                    f"KCDLoader: rank(s) {missing} {reason} within {bound}: such a rank raised (and lives on), died, "
                    f"or runs other code than rank {info.rank}; {RULE}"
                ) from None
        posts = {r: ch.store.get(key).decode() for r, key in peers.items()}
    except CollectiveError as err:
        ch.failed = str(err)
        raise
    except RuntimeError as err:  # the store itself failed (its host, rank 0 under torchrun, died?)
        ch.failed = f"the process group's store failed during {what}: {err}"
        raise CollectiveError(
            f"KCDLoader: {ch.failed}; the rank hosting the store (rank 0 under torchrun) may have died"
        ) from err
    posts[info.rank] = header
    if any(p.split("|", 2)[:2] != [op, str(epoch)] for p in posts.values()):
        seen = "; ".join(f"rank {r}: {p.split('|', 2)[-1]}" for r, p in sorted(posts.items()))
        ch.failed = f"the ranks called different collectives ({seen})"
        raise CollectiveError(f"KCDLoader: {ch.failed}: {RULE}")
    if seq > 0:  # every rank has read the posts of seq - 1 (it posted seq after reading them)
        try:
            ch.store.delete_key(f"{ch.prefix}{seq - 1}/{info.rank}")
        except (RuntimeError, AttributeError):
            pass
