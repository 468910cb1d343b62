"""Datasets: in-memory arrays VAKS blends into, and class-per-folder image files.

- :mod:`kcd_fast.data.arrays`: :class:`ArrayDataset` and the lookup of a dataset's
  blendable uint8 image storage (``ArrayDataset.images``, or a torchvision-style ``.data``);
- :mod:`kcd_fast.data.folders`: :class:`ImageFolder` (one reader, one extension list,
  torchvision's sample order) and :func:`load_rgb`, the one image decoder on the host.
- :mod:`kcd_fast.data.errors`: :class:`UnreadableSampleError`, the one error every back end
  raises for a sample it cannot read, and the regular-file checks made before opening one.
"""

from .arrays import ArrayDataset, has_images, image_storage, require_image_storage
from .errors import MissingSampleError, UnreadableSampleError
from .folders import IMAGE_EXTENSIONS, ImageFolder, UnreadableImageError, is_image_folder, load_rgb
from .indexed import WithIndices

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "ImageFolder",
    "MissingSampleError",
    "UnreadableImageError",
    "UnreadableSampleError",
    "has_images",
    "image_storage",
    "is_image_folder",
    "load_rgb",
    "require_image_storage",
    "WithIndices",
]
