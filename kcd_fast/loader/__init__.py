"""The condensing loader: :class:`KCDLoader` and its parts.

- :mod:`.core`: :class:`KCDLoader`, the backend-agnostic core (epochs, observe,
  condensation, VAKS summaries, state, the DataLoader surface);
- :mod:`.config`: :class:`LoaderConfig`, the configuration, validated once;
- :mod:`.plan`: epoch order, DDP shards, batches and the seeds of each epoch's streams;
- :mod:`.state`: the saved state's schema, the summary log, image digests, replay;
- :mod:`.batch_sampler`: :class:`KCDBatchSampler`, the same core for a DataLoader you build;
- :mod:`.transfer`: batches moved to ``batch_device`` (pinned, ``non_blocking``) by the core;
- :mod:`.backends`: the torch, DALI and indices back ends that move and transform samples.
"""

from .batch_sampler import KCDBatchSampler
from .config import Backend, LoaderConfig
from .core import KCDLoader

__all__ = ["Backend", "KCDBatchSampler", "KCDLoader", "LoaderConfig"]
