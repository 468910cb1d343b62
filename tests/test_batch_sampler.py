"""KCDBatchSampler behind a torch DataLoader built by the user: the same epochs, order,
condensations and state as KCDLoader, with and without workers reading ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kcd_fast import ArrayDataset, CondensationSchedule, KCDBatchSampler, KCDLoader, WithIndices

N, C = 90, 5
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.7)


def _data(seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8), rng.integers(0, C, N))


def _logits(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(x[0].numel(), C, generator=g)
    return x.flatten(1) @ w


def _run_loader(epochs: int = SCHED.epochs):
    loader = KCDLoader(_data(), SCHED, batch_size=16, shuffle=True, seed=3)
    orders = []
    for _ in range(epochs):
        order = []
        for x, _y, idx in loader:
            loader.observe(idx, _logits(x))
            order += idx.tolist()
        orders.append(order)
    return orders, loader


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_sampler_matches_kcd_loader(num_workers: int) -> None:
    ref_orders, ref = _run_loader()
    ds = _data()
    sampler = KCDBatchSampler(ds, SCHED, batch_size=16, shuffle=True, seed=3)
    dl = DataLoader(WithIndices(ds), batch_sampler=sampler, num_workers=num_workers)
    orders = []
    for _ in range(SCHED.epochs):
        order = []
        for x, _y, idx in dl:
            sampler.observe(idx, _logits(x))
            order += idx.tolist()
        orders.append(order)
    assert orders == ref_orders
    assert [len(o) for o in orders] == SCHED.epoch_sizes(N)
    assert sampler.history == ref.history
    assert torch.equal(ds.images, ref.dataset.images)  # the same VAKS summaries, in the DataLoader's dataset
    assert len(dl) == 0 or sampler.epoch == SCHED.epochs
    assert sampler.total_steps() == ref.total_steps()


def test_mid_epoch_state_counts_observed_batches_not_the_read_ahead() -> None:
    ref_orders, ref = _run_loader()
    ds = _data()
    sampler = KCDBatchSampler(ds, SCHED, batch_size=16, shuffle=True, seed=3)
    dl = DataLoader(WithIndices(ds), batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    orders = [[] for _ in range(SCHED.epochs)]
    for _ in range(2):
        for x, _y, idx in dl:
            orders[sampler.epoch] += idx.tolist()  # before observing: the last batch's observe condenses
            sampler.observe(idx, _logits(x))
    it = iter(dl)
    for _ in range(2):  # two batches trained in epoch 2; the workers have fetched more
        x, _y, idx = next(it)
        sampler.observe(idx, _logits(x))
        orders[2] += idx.tolist()
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 2
    del it

    ds2 = _data()  # the ORIGINAL images: the summaries are replayed
    resumed = KCDBatchSampler(ds2, SCHED, batch_size=16, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    dl2 = DataLoader(WithIndices(ds2), batch_sampler=resumed, num_workers=2)
    for _ in range(2, SCHED.epochs):
        for x, _y, idx in dl2:
            orders[resumed.epoch] += idx.tolist()
            resumed.observe(idx, _logits(x))
    assert orders == ref_orders
    assert resumed.history == ref.history
    assert torch.equal(resumed.bank.sums, ref.bank.sums)


def test_batch_sampler_refuses_dataloader_options_and_wraps_samples() -> None:
    with pytest.raises(TypeError, match="KCDBatchSampler takes no num_workers=4"):
        KCDBatchSampler(_data(), SCHED, batch_size=4, num_workers=4)
    w = WithIndices(_data())
    x, y, i = w[5]
    assert i == 5 and x.shape == (3, 4, 4)
    assert WithIndices([{"a": 1}])[0] == {"a": 1, "index": 0}
    with pytest.raises(KeyError, match="already has a key 'index'"):
        WithIndices([{"index": 1}])[0]
    assert len(w.images) == N  # attributes of the wrapped dataset
