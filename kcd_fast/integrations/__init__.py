"""KCD inside the trainers people use. Each module imports its framework lazily, so
``import kcd_fast`` never needs them:

- :mod:`.lightning`: :class:`~kcd_fast.integrations.lightning.KCDCallback` for PyTorch
  Lightning (``pip install kcd_fast[lightning]``);
- :mod:`.hf`: :class:`~kcd_fast.integrations.hf.KCDTrainer`, a ``transformers.Trainer``
  (``pip install kcd_fast[hf]``);
- :mod:`.outputs`: what both read from a training step's output (logits, mask, scores).
"""
