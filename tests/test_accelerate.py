"""KCD under real Hugging Face accelerate (CPU, tiny data): ``accelerator.prepare`` leaves a
KCDLoader as it is, ``batch_device`` delivers batches on ``accelerator.device``, and
``save_state`` / ``load_state`` mid-epoch (``register_for_checkpointing``) resume exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from kcd_fast import ArrayDataset, CondensationSchedule, KCDBatchSampler, KCDLoader  # noqa: E402

N, C, B = 60, 5, 8
SCHED = CondensationSchedule(epochs=4, period=2, rho=0.7)  # epochs of 8, 6, 6, 6 batches
_rng = np.random.default_rng(2)
IMAGES = _rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
LABELS = _rng.integers(0, C, N)


class Run:
    """One accelerate training run; ``stop_at``: save_state after that many steps and stop."""

    def __init__(
        self, ckpt: Path, resume: bool = False, stop_at: int | None = None, accumulate: int = 1, mode: str = "manual"
    ):
        # mode "accelerate": accelerate's own accumulation (Accelerator(gradient_accumulation_steps=k),
        # accumulate()); "manual": the loop written out in docs/integrations.md
        steps = accumulate if mode == "accelerate" else 1
        self.acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=steps)
        g = torch.Generator().manual_seed(0)
        net = torch.nn.Linear(48, C)
        with torch.no_grad():
            net.weight.copy_(torch.randn(C, 48, generator=g) * 0.1)
            net.bias.zero_()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        self.loader = KCDLoader(
            ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=3, batch_device=self.acc.device
        )
        self.net, self.opt, same = self.acc.prepare(net, opt, self.loader)
        assert same is self.loader  # accelerate only wraps torch DataLoaders
        self.acc.register_for_checkpointing(self.loader)
        if resume:
            self.acc.load_state(str(ckpt))
        self.trained: list[list[int]] = []
        self.stepped: dict[int, int] = {}  # optimizer steps per epoch
        if accumulate > 1:
            loop = self._accumulate_with_accelerate if mode == "accelerate" else self._accumulating
            loop(ckpt, stop_at, accumulate)
            return
        for _ in range(self.loader.epoch, SCHED.epochs):
            for x, y, idx in self.loader:
                assert x.device == self.acc.device and idx.device.type == "cpu"
                logits = self.net(x.flatten(1))
                loss = torch.nn.functional.cross_entropy(logits, y)
                self.opt.zero_grad()
                self.acc.backward(loss)
                self.opt.step()
                if self._observed(idx, logits, ckpt, stop_at):
                    return

    def _observed(self, idx: torch.Tensor, logits: torch.Tensor, ckpt: Path, stop_at: int | None) -> bool:
        """Observes a trained batch; True (after save_state) once ``stop_at`` batches are trained."""
        self.loader.observe(idx, logits)
        self.trained.append(idx.tolist())
        if stop_at is not None and len(self.trained) == stop_at:
            self.acc.save_state(str(ckpt))
            return True
        return False

    def _accumulating(self, ckpt: Path, stop_at: int | None, k: int) -> None:
        """Accumulation written out by hand: a step at every k-th batch and at each epoch's
        last (what accumulate() must match)."""
        import contextlib

        loader = self.loader
        for epoch in range(loader.epoch, SCHED.epochs):
            n = len(loader)
            for i, (x, y, idx) in enumerate(loader, start=loader.resume_position):
                step = (i + 1) % k == 0 or i + 1 == n
                with contextlib.nullcontext() if step else self.acc.no_sync(self.net):
                    logits = self.net(x.flatten(1))
                    self.acc.backward(torch.nn.functional.cross_entropy(logits, y) / k)
                if step:
                    self.opt.step()
                    self.opt.zero_grad()
                    self.stepped[epoch] = self.stepped.get(epoch, 0) + 1
                if self._observed(idx, logits, ckpt, stop_at):
                    return

    def _accumulate_with_accelerate(self, ckpt: Path, stop_at: int | None, k: int) -> None:
        """accelerate's documented accumulation loop, unchanged."""
        loader = self.loader
        for epoch in range(loader.epoch, SCHED.epochs):
            for x, y, idx in loader:
                with self.acc.accumulate(self.net):
                    logits = self.net(x.flatten(1))
                    self.acc.backward(torch.nn.functional.cross_entropy(logits, y))
                    self.opt.step()
                    self.opt.zero_grad()
                if self.acc.sync_gradients:
                    self.stepped[epoch] = self.stepped.get(epoch, 0) + 1
                if self._observed(idx, logits, ckpt, stop_at):
                    return


def test_accelerate_accumulate_steps_at_each_epochs_end(tmp_path) -> None:
    """accelerator.accumulate() sees a KCDLoader's epoch ends (it registers with accelerate's
    GradientState while it iterates): the same optimizer steps, and bit for bit the same weights,
    as the loop that steps every k-th batch and each epoch's last."""
    manual = Run(tmp_path / "unused", accumulate=3)
    auto = Run(tmp_path / "unused", accumulate=3, mode="accelerate")
    assert auto.stepped == manual.stepped == {e: -(-n // 3) for e, n in enumerate(auto.loader.steps_per_epoch())}
    assert auto.trained == manual.trained
    for a, b in zip(manual.net.parameters(), auto.net.parameters(), strict=True):
        assert torch.equal(a, b)
    state = accelerate.state.GradientState()
    assert not state.in_dataloader  # every epoch's iterator unregistered itself


@pytest.mark.parametrize("step", [6, 8, 14])  # after a step mid-epoch 0, at the end of epochs 0 and 1
def test_the_documented_accumulation_loop_steps_each_epochs_last_group(tmp_path, step: int) -> None:
    ref = Run(tmp_path / "unused", accumulate=3)
    lengths = ref.loader.steps_per_epoch()  # [8, 6, 6, 6]: partial last groups of 2 in epoch 0
    assert ref.stepped == {e: -(-n // 3) for e, n in enumerate(lengths)}
    assert sum(ref.stepped.values()) == ref.loader.total_steps(3)
    Run(tmp_path / "ckpt", stop_at=step, accumulate=3)
    resumed = Run(tmp_path / "ckpt", resume=True, accumulate=3)
    assert ref.trained[step:] == resumed.trained
    for a, b in zip(ref.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_first_batches_is_refused_with_the_reason(tmp_path, workers: int) -> None:
    """accelerate's skip_first_batches rebuilds a plain DataLoader around the loader's batch
    sampler; a restored KCDLoader already skips its trained batches, so this would skip them
    twice (or yield nothing): refused, naming the remedy, before any batch."""
    Run(tmp_path / "ckpt", stop_at=3)
    acc = accelerate.Accelerator(cpu=True)
    loader = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=3, num_workers=workers)
    acc.register_for_checkpointing(loader)
    acc.load_state(str(tmp_path / "ckpt"))
    assert loader.resume_position == 3
    assert len(loader.batch_sampler) == len(loader.sampler) == len(loader) == 8  # as a DataLoader's
    outside = r"batch sampler .* was iterated outside the loader .*skip_first_batches.*: iterate the KCDLoader itself"
    with pytest.raises(RuntimeError, match=outside):
        list(acc.skip_first_batches(loader, loader.resume_position))
    got = [idx.tolist() for _, _, idx in loader]  # the loader itself resumes where the state says
    assert len(got) == loader.steps_per_epoch()[0] - 3
    # the same once the loader has iterated (its sampler held that epoch's plan)
    loader = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=3, num_workers=workers)
    acc = accelerate.Accelerator(cpu=True)
    acc.register_for_checkpointing(loader)
    for k, (_, _, idx) in enumerate(loader):
        loader.observe(idx, torch.zeros(len(idx), C))
        if k == 4:
            break
    acc.load_state(str(tmp_path / "ckpt"))
    with pytest.raises(RuntimeError, match=outside):
        list(acc.skip_first_batches(loader, loader.resume_position))
    assert len([idx for _, _, idx in loader]) == loader.steps_per_epoch()[0] - 3


@pytest.mark.parametrize("step", [3, 8, 11, 23])  # mid-epoch 0, the end of epoch 0, mid-epochs 1 and 3
def test_save_state_load_state_mid_epoch_resumes_exactly(tmp_path, step: int) -> None:
    ref = Run(tmp_path / "unused")
    assert sum(len(b) for b in ref.trained) == sum(SCHED.epoch_sizes(N))
    Run(tmp_path / "ckpt", stop_at=step)
    resumed = Run(tmp_path / "ckpt", resume=True)
    assert resumed.trained == ref.trained[step:]  # exactly the batches the interrupted run had not trained
    for a, b in zip(ref.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = ref.loader.state_dict(), resumed.loader.state_dict()
    assert torch.equal(sa["bank"]["sums"], sb["bank"]["sums"]) and torch.equal(
        sa["bank"]["counts"], sb["bank"]["counts"]
    )
    assert sa["history"] == sb["history"] and torch.equal(sa["active"], sb["active"])
    assert torch.equal(ref.loader.images, resumed.loader.images)
    assert resumed.loader.epoch == SCHED.epochs


def test_batch_device_is_checked_and_named() -> None:
    ds = ArrayDataset(IMAGES, LABELS)
    with pytest.raises(ValueError, match=r"batch_device must be None, 'cpu' or 'cuda\[:k\]', got 'tpu'"):
        KCDLoader(ds, SCHED, batch_device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"batch_device='cuda' but torch sees no CUDA device"):
            KCDLoader(ds, SCHED, batch_device="cuda")
    with pytest.raises(TypeError, match=r"KCDBatchSampler takes no batch_device='cpu'"):
        KCDBatchSampler(ds, SCHED, batch_device="cpu")


def test_batch_device_cpu_delivers_the_same_batches() -> None:
    a = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=1)
    b = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=1, batch_device="cpu")
    assert b.config.batch_device == torch.device("cpu")
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


@pytest.mark.needs_cuda
@pytest.mark.parametrize(
    ("backend", "options"),
    [("torch", {}), ("torch", {"pin_memory": True}), ("torch", {"num_workers": 1, "pin_memory": True}), ("tensor", {})],
)
def test_batch_device_cuda_delivers_cuda_batches(backend: str, options: dict) -> None:
    ref = KCDLoader(ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=1, backend=backend)
    dev = KCDLoader(
        ArrayDataset(IMAGES, LABELS), SCHED, batch_size=B, shuffle=True, seed=1, backend=backend,
        batch_device="cuda", **options,
    )  # fmt: skip
    for (xa, ya, ia), (xb, yb, ib) in zip(ref, dev, strict=True):
        assert xb.device.type == "cuda" and yb.device.type == "cuda" and ib.device.type == "cpu"
        assert torch.equal(xa.to(xb.device), xb) and torch.equal(ya.to(yb.device), yb) and torch.equal(ia, ib)
        dev.observe(ib, torch.zeros(len(ib), C, device="cuda"))
        ref.observe(ia, torch.zeros(len(ia), C))


def test_to_batch_device_moves_every_tensor_and_keeps_the_structure() -> None:
    from collections import OrderedDict, namedtuple

    from kcd_fast.loader.transfer import to_batch_device

    Pair = namedtuple("Pair", "x y")
    batch = (
        torch.ones(2, 3),
        [torch.zeros(2), "text", 7, None],
        {"input_ids": torch.arange(4), "nested": OrderedDict(mask=torch.ones(4, dtype=torch.bool))},
        Pair(torch.ones(1), 3),
    )
    meta = torch.device("meta")  # a device every machine has: shows what moves, without a GPU
    out = to_batch_device(batch, meta)
    assert type(out) is tuple and type(out[1]) is list and type(out[3]) is Pair
    assert isinstance(out[2]["nested"], OrderedDict)
    tensors = [out[0], out[1][0], out[2]["input_ids"], out[2]["nested"]["mask"], out[3].x]
    assert all(t.device == meta for t in tensors)
    assert out[1][1:] == ["text", 7, None] and out[3].y == 3
    assert out[2]["nested"]["mask"].dtype == torch.bool and out[0].shape == (2, 3)
    same = to_batch_device(batch, torch.device("cpu"))
    assert same[0] is batch[0]  # already there: not copied
