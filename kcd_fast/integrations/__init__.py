"""KCD inside the trainers people use. Each module imports its framework lazily, so
``import kcd_fast`` never needs them:

- :mod:`.lightning`: :class:`~kcd_fast.integrations.lightning.KCDCallback` for PyTorch
  Lightning (``pip install kcd_fast[lightning]``);
- :mod:`.hf`: :class:`~kcd_fast.integrations.hf.KCDTrainer`, a ``transformers.Trainer``
  (``pip install kcd_fast[hf]``);
- :mod:`.torchdistill`: importing it registers KCD's batch sampler, dataset wrapper, forward
  and post-forward steps in torchdistill's registries, named in its YAML
  (``pip install kcd_fast[torchdistill]``);
- :mod:`.outputs`: what Lightning and the HF Trainer read from a training step's output
  (logits, mask, scores).

Hugging Face accelerate needs no module: ``KCDLoader(..., batch_device=accelerator.device)``
and ``accelerator.register_for_checkpointing(loader)`` (docs/integrations.md).
"""
