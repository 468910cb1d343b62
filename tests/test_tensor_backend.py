"""The tensor back end: the fused augmentation kernel against the numpy reference, and
KCDLoader(backend="tensor") against the torch back end (same points, order, condensations,
summaries and state), resume, recipes and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader, ops
from kcd_fast import _reference as R
from kcd_fast.loader.backends.base import batch_seed
from kcd_fast.loader.backends.recipes import CIFAR_MEAN, CIFAR_STD, Recipe

C = 5
SCHED = CondensationSchedule(epochs=6, period=2, rho=0.5)


def _case(rng: np.random.Generator):
    n, h, w, c = (int(v) for v in (rng.integers(1, 7), rng.integers(1, 10), rng.integers(1, 10), rng.integers(1, 5)))
    pad = int(rng.integers(0, 5))
    oh, ow = int(rng.integers(1, h + 2 * pad + 1)), int(rng.integers(1, w + 2 * pad + 1))
    b = int(rng.integers(0, 9))
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    idx = rng.integers(0, n, b)
    params = np.zeros((b, 3), dtype=np.int32)
    params[:, 0] = rng.integers(0, h + 2 * pad - oh + 1, b)
    params[:, 1] = rng.integers(0, w + 2 * pad - ow + 1, b)
    params[:, 2] = rng.integers(0, 2, b)
    mean, std = rng.random(c), rng.random(c) + 0.05
    return images, idx, params, (oh, ow), pad, mean, std


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_augment_matches_reference(seed: int, channels_last: bool, dtype: torch.dtype) -> None:
    images, idx, params, size, pad, mean, std = _case(np.random.default_rng(seed))
    out = ops.augment(
        torch.from_numpy(images),
        torch.from_numpy(idx),
        torch.from_numpy(params),
        out_size=size,
        pad=pad,
        mean=mean,
        std=std,
        dtype=dtype,
        channels_last=channels_last,
    )
    scale, shift = ops.normalization(mean, std, images.shape[3])
    ref = torch.from_numpy(R.augment(images, idx, params, size, pad, scale.numpy(), shift.numpy()))
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.equal(out, ref.to(dtype))  # bit for bit (bf16: rounded to nearest even from the same floats)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("seed", range(6))
def test_augment_fill_colours_the_padding(seed: int) -> None:
    images, idx, params, size, pad, mean, std = _case(np.random.default_rng(100 + seed))
    fill = np.random.default_rng(seed).random(images.shape[3])
    out = ops.augment(
        torch.from_numpy(images),
        torch.from_numpy(idx),
        torch.from_numpy(params),
        out_size=size,
        pad=pad,
        mean=mean,
        std=std,
        fill=fill,
    )
    scale, shift = ops.normalization(mean, std, images.shape[3])
    pad_out = ops.fill_values(fill, mean, std, images.shape[3])
    ref = R.augment(images, idx, params, size, pad, scale.numpy(), shift.numpy(), pad_out.numpy())
    assert torch.equal(out, torch.from_numpy(ref))


def test_augment_bad_params_and_indices_write_nothing() -> None:
    images = torch.zeros(3, 4, 4, 3, dtype=torch.uint8)
    out = torch.full((2, 3, 4, 4), 7.0)
    kw = {"out_size": (4, 4), "pad": 1, "out": out}
    with pytest.raises(ValueError, match=r"params\[1\] = \(0, 3, 0\) is not a crop origin in \[0, 2\] x \[0, 2\]"):
        ops.augment(images, torch.tensor([0, 1]), torch.tensor([[0, 0, 0], [0, 3, 0]], dtype=torch.int32), **kw)
    with pytest.raises(IndexError, match=r"indices\[0\] = 3 is outside \[0, 3\)"):
        ops.augment(images, torch.tensor([3, 1]), torch.zeros(2, 3, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match=r"flip 0 or 1"):
        ops.augment(images, torch.tensor([0, 1]), torch.tensor([[0, 0, 2], [0, 0, 0]], dtype=torch.int32), **kw)
    assert bool((out == 7.0).all())
    with pytest.raises(ValueError, match=r"out_size \(7, 4\) with pad 1 does not fit images of 4x4"):
        ops.augment(images, torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int32), out_size=(7, 4), pad=1)
    with pytest.raises(ValueError, match=r"params must be \[B, 3\] = \[1, 3\]"):
        ops.augment(images, torch.tensor([0]), torch.zeros(1, 2, dtype=torch.int32), out_size=(4, 4))
    with pytest.raises(ValueError, match=r"std finite and > 0"):
        ops.augment(images, torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int32), out_size=(4, 4), std=(0.0,))


# -- the back end ------------------------------------------------------------------------------
def _data(n: int = 97, hw: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), rng.integers(0, C, n)


class StoredModel:
    """Logits from the stored image of each index (so both back ends observe the same)."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(n)
        self.table = torch.randn(n, C, generator=g)

    def __call__(self, ds: ArrayDataset, idx: torch.Tensor) -> torch.Tensor:
        s = ds.images[idx].reshape(len(idx), -1).sum(1, dtype=torch.int64).float()
        return self.table[idx] + (s / 5000.0)[:, None]


def _train(loader: KCDLoader, ds: ArrayDataset, model: StoredModel, epochs: int):
    seen, xs = [], []
    for _ in range(epochs):
        order, imgs = [], []
        for x, y, idx in loader:
            assert torch.equal(y, ds.labels[idx])
            loader.observe(idx, model(ds, idx))
            order.append(idx)
            imgs.append(x)
        seen.append(torch.cat(order))
        xs.append(torch.cat(imgs))
    return seen, xs


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("vaks", ["low", "random"])
def test_same_points_order_condensations_and_summaries_as_the_torch_back_end(drop_last: bool, vaks: str) -> None:
    images, labels = _data()
    kw = {"batch_size": 8, "shuffle": True, "seed": 4, "drop_last": drop_last, "vaks": vaks}
    ds_t, ds_x = ArrayDataset(images, labels), ArrayDataset(images, labels)
    torch_loader = KCDLoader(ds_t, SCHED, **kw)
    tensor_loader = KCDLoader(ds_x, SCHED, backend="tensor", **kw)
    assert tensor_loader.steps_per_epoch() == torch_loader.steps_per_epoch()
    seen_t, xs_t = _train(torch_loader, ds_t, StoredModel(97), SCHED.epochs)
    seen_x, xs_x = _train(tensor_loader, ds_x, StoredModel(97), SCHED.epochs)
    for a, b, xa, xb in zip(seen_t, seen_x, xs_t, xs_x, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(xb, xa, rtol=0, atol=1e-6)  # v * (1/255) vs v / 255: within an ulp
    assert tensor_loader.history == torch_loader.history
    assert torch.equal(ds_x.images, ds_t.images)  # the same VAKS summaries, blended into the storage
    st, sx = torch_loader.state_dict(), tensor_loader.state_dict()
    assert torch.equal(st["bank"]["sums"], sx["bank"]["sums"]) and st["digest"] == sx["digest"]


@pytest.mark.parametrize("stop_batches", [0, 3])
def test_resume_mid_epoch_and_between_epochs_is_bit_exact(stop_batches: int) -> None:
    images, labels = _data(n=61, hw=8, seed=2)
    kw = {"batch_size": 6, "shuffle": True, "seed": 9, "backend": "tensor", "augment": "cifar"}
    model = StoredModel(61)
    ds = ArrayDataset(images, labels)
    full = KCDLoader(ds, SCHED, **kw)
    ref_seen, ref_x = _train(full, ds, model, SCHED.epochs)

    ds1 = ArrayDataset(images, labels)
    first = KCDLoader(ds1, SCHED, **kw)
    _train(first, ds1, model, 3)
    it = iter(first)
    for _ in range(stop_batches):
        _x, _y, idx = next(it)
        first.observe(idx, model(ds1, idx))
    state = first.state_dict()
    assert state["position"] == stop_batches

    ds2 = ArrayDataset(images, labels)  # the ORIGINAL images
    resumed = KCDLoader(ds2, SCHED, **kw)
    resumed.load_state_dict(state)
    seen, xs = _train(resumed, ds2, model, SCHED.epochs - 3)
    cut = stop_batches * 6
    assert torch.equal(seen[0], ref_seen[3][cut:]) and torch.equal(xs[0], ref_x[3][cut:])
    for a, b, xa, xb in zip(seen[1:], ref_seen[4:], xs[1:], ref_x[4:], strict=True):
        assert torch.equal(a, b) and torch.equal(xa, xb)
    assert torch.equal(ds2.images, ds.images)


def test_cifar_recipe_is_the_kernel_with_params_from_the_batch_seed() -> None:
    images, labels = _data(n=40, hw=32, seed=3)
    ds = ArrayDataset(images, labels)
    loader = KCDLoader(ds, SCHED, batch_size=16, shuffle=True, seed=5, backend="tensor", augment="cifar")
    x, _y, idx = next(iter(loader))
    be = loader.backend
    params = be.params(16, batch_seed(loader._planner.plan(loader._active, 0).worker_seed, 0))
    assert params[:, 2].min() == 0 and params[:, 2].max() == 1 and params[:, :2].max() <= 8
    scale, shift = ops.normalization(CIFAR_MEAN, CIFAR_STD, 3)
    ref = R.augment(images, idx.numpy(), params, (32, 32), 4, scale.numpy(), shift.numpy())
    assert torch.equal(x, torch.from_numpy(ref))


def test_recipes_center_crop_callable_and_output_formats() -> None:
    images, labels = _data(n=20, hw=12, seed=1)
    ds = ArrayDataset(images, labels)
    center = KCDLoader(ds, SCHED, batch_size=5, backend="tensor", augment=Recipe.center(8, mean=(0.5,), std=(0.5,)))
    x, _y, idx = next(iter(center))
    want = (torch.from_numpy(images[idx.numpy(), 2:10, 2:10]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)

    calls = []

    def jitter(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(batch.shape)
        return batch + torch.rand(batch.shape, generator=generator) * 0.01

    runs = []
    for _ in range(2):  # seeded per batch: the same numbers every run
        loader = KCDLoader(ds, SCHED, batch_size=5, shuffle=True, seed=1, backend="tensor", augment=jitter)
        runs.append(next(iter(loader))[0])
    assert torch.equal(runs[0], runs[1]) and calls[0] == (5, 3, 12, 12)

    bf = KCDLoader(ds, SCHED, batch_size=5, backend="tensor", channels_last=True, dtype="bfloat16")
    x, _y, _i = next(iter(bf))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_tensor_back_end_argument_checks() -> None:
    images, labels = _data(n=10)
    ds = ArrayDataset(images, labels)
    with pytest.raises(TypeError, match="backend='tensor' gathers batches from kcd_fast.ArrayDataset storage"):
        KCDLoader(list(zip(images, labels, strict=True)), SCHED, backend="tensor", vaks="off")
    with pytest.raises(ValueError, match="make the ArrayDataset without a per-item transform"):
        KCDLoader(ArrayDataset(images, labels, transform=lambda im: im), SCHED, backend="tensor")
    with pytest.raises(ValueError, match="num_workers must be 0, got 2"):
        KCDLoader(ds, SCHED, backend="tensor", num_workers=2)
    with pytest.raises(ValueError, match=r"dali_device=None: an option of backend='dali', not of backend='tensor'"):
        KCDLoader(ds, SCHED, backend="tensor", dali_device=None)
    with pytest.raises(ValueError, match=r"channels_last=True: an option of backend='tensor', not of backend='torch'"):
        KCDLoader(ds, SCHED, channels_last=True)
    with pytest.raises(ValueError, match="augment must be None, 'cifar', 'cifar_eval'"):
        KCDLoader(ds, SCHED, backend="tensor", augment="imagenet")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16', got 'float16'"):
        KCDLoader(ds, SCHED, backend="tensor", dtype="float16")
    with pytest.raises(ValueError, match="collate_fn must be None"):
        KCDLoader(ds, SCHED, backend="tensor", collate_fn=list)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("where", ["storage", "prefetch"])
def test_cuda_batches_match_the_cpu_back_end(where: str) -> None:
    images, labels = _data(n=50, hw=32, seed=7)
    kw = {"batch_size": 8, "shuffle": True, "seed": 2, "backend": "tensor", "augment": "cifar"}
    cpu = KCDLoader(ArrayDataset(images, labels), SCHED, **kw)
    if where == "storage":
        gpu = KCDLoader(ArrayDataset(images, labels, device="cuda"), SCHED, **kw)
    else:
        gpu = KCDLoader(ArrayDataset(images, labels), SCHED, tensor_device="cuda", **kw)
    for (xa, ya, ia), (xb, yb, ib) in zip(cpu, gpu, strict=True):
        assert xb.is_cuda and torch.equal(ia, ib) and torch.equal(ya, yb.cpu())
        assert torch.equal(xa, xb.cpu())
