"""Back ends of :class:`kcd_fast.KCDLoader`: they only move and transform samples.

- :mod:`.base`: the protocol the core calls, the epoch batch sampler, the images a summary
  applies to (arrays in memory);
- :mod:`.torch`: ``torch.utils.data.DataLoader`` workers (``backend="torch"``);
- :mod:`.dali`: NVIDIA DALI pipelines (``backend="dali"``), :mod:`.dali_overlay` its
  summarised images of image folders;
- :mod:`.factory`: builds the one a loader asked for, with its options.
"""
