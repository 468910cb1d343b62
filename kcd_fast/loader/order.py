"""The options that decide an epoch's batches, recorded in every saved state and checked
when a state is loaded.

A state (``KCDLoader.state_dict()``) carries ``order``, a dict of plain values::

    batch_size  points per batch            shuffle     the epoch order is shuffled
    drop_last   the last partial batch cut  seed        the run's seed (every order derives from it)
    world_size  the ranks it was taken on   backend     "torch", "dali", "tensor" or "indices"
    augment     the back end's augmentation (None, a recipe name, or a callable's qualified name)

Rules (:func:`check_order`), checked before anything changes:

- a state taken mid-epoch (``position > 0``) continues only with the same ``batch_size``,
  ``shuffle``, ``drop_last``, ``world_size``, ``backend`` and ``augment``: the batches left
  of that epoch depend on each of them. Another value raises ``ValueError`` naming the
  option and both values (before: batch_size 4 -> 6 was accepted and left six points of
  that epoch unvisited);
- a state taken between epochs (``position == 0``) continues with this loader's values:
  an epoch's order depends only on ``(seed, epoch)``, its active set and ``shuffle``, so the
  next epochs are planned with the new values and the continuation is exact (the same
  active sets, summaries and value bank as a run that changed them at that epoch boundary;
  the usual case: another number of GPUs, and a per-rank batch size that keeps the global
  batch);
- ``seed``: the state's seed is the run's and always continues (the loader adopts it, as
  ``load_state_dict`` always has), so any seed given to the new loader is replaced.

A state without ``order`` (kcd_fast 0.1) is checked on ``world_size`` alone, as before.
"""

from __future__ import annotations

from typing import Any

from .._checks import is_int
from .config import Backend, LoaderConfig

__all__ = ["ORDER_KEY", "check_order", "order_record"]

ORDER_KEY = "order"
MID_EPOCH = ("batch_size", "shuffle", "drop_last", "world_size", "backend", "augment")  # between epochs: free


def _augment_name(augment: Any) -> Any:
    """A plain, comparable name for a back end's ``augment`` option."""
    if augment is None or isinstance(augment, (str, int, float, bool)):
        return augment
    if callable(augment) and hasattr(augment, "__qualname__"):
        return f"{getattr(augment, '__module__', '?')}.{augment.__qualname__}"
    return repr(augment)


def order_record(config: LoaderConfig, world_size: int, backend_options: dict[str, Any]) -> dict[str, Any]:
    """The ``order`` entry of a state for a loader built with ``config`` on ``world_size``
    ranks with ``backend_options`` (as given: the back end's defaults fill in the rest)."""
    augment = None
    if config.backend in (Backend.DALI, Backend.TENSOR):
        from .backends.factory import OPTIONS

        augment = {**OPTIONS[config.backend], **backend_options}.get("augment")
    return {
        "batch_size": config.batch_size,
        "shuffle": config.shuffle,
        "drop_last": config.drop_last,
        "seed": config.seed,
        "world_size": int(world_size),
        "backend": config.backend.value,
        "augment": _augment_name(augment),
    }


def check_order(saved: Any, current: dict[str, Any], position: Any, epoch: Any) -> None:
    """Raises ``ValueError`` when a state whose ``order`` entry is ``saved``, taken
    ``position`` batches into ``epoch``, cannot continue exactly in a loader whose record is
    ``current`` (see the module docstring). ``saved`` None: a state of kcd_fast 0.1, not
    checked here."""
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"state order must be a dict of the options that decide the batches, got {saved!r}")
    mid = is_int(position) and position > 0
    if not mid:
        return
    for key in MID_EPOCH:
        if key in saved and saved[key] != current[key]:
            raise ValueError(
                f"the state was taken mid-epoch (after {position} batch{'es' if position != 1 else ''} of epoch "
                f"{epoch}) with "
                f"{key}={saved[key]!r}, this loader has {key}={current[key]!r}: the batches left of that epoch "
                f"depend on {key}; build the loader with {key}={saved[key]!r}, or resume from a state taken "
                f"between epochs (where {key} may change)"
            )
