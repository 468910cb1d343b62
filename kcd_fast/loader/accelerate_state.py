"""Epoch ends for Hugging Face accelerate's gradient accumulation.

``accelerator.accumulate(model)`` steps the optimizer every ``gradient_accumulation_steps``
batches and at the last batch of the dataloader being iterated, which it learns from the
dataloaders ``accelerator.prepare`` wrapped: they register with accelerate's process-wide
``GradientState`` while they iterate and say when their last batch is out
(``end_of_dataloader``). ``prepare`` leaves a KCDLoader as it is, so without this its epochs
were invisible: accumulation groups ran across epochs and condensations, and the run's last
partial group was never stepped. A KCDLoader iterating in a process where an ``Accelerator``
exists registers the same way (accelerate's private ``_add_dataloader`` /
``_remove_dataloader``, the calls its own DataLoaders make; tested against the installed
accelerate in ``tests/test_accelerate.py``). Nothing is imported: without accelerate, or
before an ``Accelerator`` was made, nothing happens.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["gradient_state"]


def gradient_state() -> Any:
    """accelerate's ``GradientState`` once an ``Accelerator`` exists in this process, else None."""
    module = sys.modules.get("accelerate.state")
    cls = getattr(module, "GradientState", None)
    if cls is None or not getattr(cls, "_shared_state", None):  # accelerate not imported, or no Accelerator yet
        return None
    state = cls()
    if not (hasattr(state, "_add_dataloader") and hasattr(state, "_remove_dataloader")):
        return None  # an accelerate without them: accumulate() cannot see epoch ends (docs/integrations.md)
    return state
