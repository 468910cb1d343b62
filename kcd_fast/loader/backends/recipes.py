"""Normalization constants and the tensor back end's augmentation recipes (the DALI back
end's recipes of the same names use the same constants)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Recipe", "parse_recipe"]

CIFAR_MEAN = (0.507, 0.487, 0.441)
CIFAR_STD = (0.267, 0.256, 0.276)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """One pass of ``ops.augment``: pad by ``pad`` (with ``fill`` on the ``[0, 1]`` scale per
    channel; None: black pixels, torchvision's padding), crop ``out_size`` (None: the stored
    size) at a random origin (``random_crop``) or the center, flip horizontally with
    probability 1/2 (``flip``), normalize ``(v / 255 - mean) / std``."""

    out_size: tuple[int, int] | None = None
    pad: int = 0
    random_crop: bool = False
    flip: bool = False
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    fill: tuple[float, ...] | None = None

    @classmethod
    def center(cls, size: int | tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Recipe:
        """The evaluation recipe for larger arrays: a center crop of ``size``, normalized."""
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return cls(out_size=hw, mean=tuple(mean), std=tuple(std))


RECIPES = {
    "none": Recipe(),  # v / 255, float [B, C, H, W]
    "cifar": Recipe(pad=4, random_crop=True, flip=True, mean=CIFAR_MEAN, std=CIFAR_STD),
    "cifar_eval": Recipe(mean=CIFAR_MEAN, std=CIFAR_STD),
}


def parse_recipe(augment: Any) -> tuple[Recipe, Callable[..., Any] | None]:
    """``augment`` -> (the kernel's recipe, a callable applied to its output or None).

    None / "none", "cifar", "cifar_eval", a :class:`Recipe`, or a callable
    ``fn(images, generator) -> images`` that gets the batch as float ``[B, C, H, W]`` in
    ``[0, 1]`` and a ``torch.Generator`` seeded for that batch (on the images' device)."""
    if augment is None:
        return RECIPES["none"], None
    if isinstance(augment, Recipe):
        return augment, None
    if isinstance(augment, str) and augment in RECIPES:
        return RECIPES[augment], None
    if callable(augment):
        return RECIPES["none"], augment
    raise ValueError(
        f"augment must be None, 'cifar', 'cifar_eval', a kcd_fast.loader.backends.recipes.Recipe or a callable "
        f"(images, generator) -> images, got {augment!r}"
    )
