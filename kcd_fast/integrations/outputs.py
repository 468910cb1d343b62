"""Observing a training step's output, shared by the integrations: the student's logits
(``[B, C]``, or ``[B, L, V]`` with a ``[B, L]`` mask), optional teacher logits, or
per-sample scores, under the keys a ``training_step`` returns them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["logits_of", "observe_step"]

KEYS = ("logits", "teacher_logits", "mask", "scores")


def logits_of(output: Any) -> torch.Tensor | None:
    """The logits in a model's forward output: the output itself when it is a tensor, its
    ``.logits`` (an HF ``ModelOutput``) or ``["logits"]``, or in a tuple (HF's
    ``return_dict=False``: ``(loss, logits, ...)`` when labels were passed, else
    ``(logits, ...)``) the first tensor that is not a scalar loss."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)):
        logits = next((t for t in output if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return logits


def observe_step(loader: Any, indices: torch.Tensor, output: Mapping[str, Any], where: str) -> None:
    """``loader.observe(indices, output["logits"], output.get("teacher_logits"),
    mask=output.get("mask"))``, or ``loader.observe_scores(indices, output["scores"])``.
    ``where`` names the output in the error when neither key is there."""
    if not isinstance(output, Mapping):
        raise TypeError(
            f"{where} must be a dict with 'loss' and 'logits' (the student's logits for the batch) or 'scores', "
            f"got {type(output).__name__}"
        )
    if "scores" in output and output["scores"] is not None:
        if output.get("logits") is not None:
            raise ValueError(f"{where} holds both 'logits' and 'scores'; return one of them (what KCD scores)")
        loader.observe_scores(indices, output["scores"])
        return
    logits = output.get("logits")
    if logits is None:
        raise ValueError(
            f"{where} has no 'logits' (the student's logits for the batch, [B, C] or [B, L, V] with 'mask') and no "
            f"'scores' ([B] per-sample values); it has keys {sorted(output)}: return e.g. "
            '{"loss": loss, "logits": logits} so that KCD can score the batch'
        )
    loader.observe(indices, logits, output.get("teacher_logits"), mask=output.get("mask"))
