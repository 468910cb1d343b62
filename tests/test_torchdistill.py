"""KCD in real torchdistill (CPU, tiny data), configured as a YAML would: the registered keys
build the loader, every epoch trains the schedule's points with every batch observed by the
registered post-forward step, torchdistill's pre-epoch step (DistributedSampler.set_epoch)
works on the batch sampler, and the loader's state resumes beside torchdistill's checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

td = pytest.importorskip("kcd_fast.integrations.torchdistill", exc_type=ImportError)

from torch.utils.data import DistributedSampler, RandomSampler  # noqa: E402
from torchdistill.common.main_util import load_ckpt, save_ckpt  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.core.interfaces.registry import get_forward_proc_func, get_post_forward_proc_func  # noqa: E402
from torchdistill.datasets.registry import get_batch_sampler, get_dataset_wrapper  # noqa: E402

from kcd_fast import ArrayDataset, CondensationSchedule  # noqa: E402

N, C, B = 120, 4, 16
SCHED = {"epochs": 4, "period": 2, "rho": 0.7}
SIZES = CondensationSchedule(**SCHED).epoch_sizes(N)
_rng = np.random.default_rng(4)
IMAGES = _rng.integers(0, 256, (N, 4, 4, 1), dtype=np.uint8)
LABELS = _rng.integers(0, C, N)


def _train_config(**loader_kwargs) -> dict:
    kd = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": 4.0,
        "alpha": 0.5,
        "reduction": "batchmean",
    }
    return {
        "num_epochs": SCHED["epochs"],
        "train_data_loader": {
            "dataset_id": "train",
            "dataset_wrapper": {"key": td.DATASET_WRAPPER_KEY},
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "batch_sampler": {"key": td.BATCH_SAMPLER_KEY, "kwargs": {"batch_size": B, "schedule": SCHED, "seed": 7}},
            "kwargs": {"num_workers": loader_kwargs.pop("num_workers", 0)},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": td.FORWARD_KEY, "sequential": [], "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.1}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}},
        },
        "post_forward_process": td.POST_FORWARD_KEY,
        **loader_kwargs,
    }


def _model(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, C))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(C, 16, generator=g) * 0.1)
        net[1].bias.zero_()
    return net


def _box(config: dict | None = None, distributed: bool = False):
    data = {"train": ArrayDataset(IMAGES, LABELS)}
    config = copy.deepcopy(config or _train_config())
    return get_distillation_box(_model(0), _model(1), data, config, torch.device("cpu"), None, distributed, 1.0)


def _train(box, epochs, trained: list[list[int]]) -> None:
    """torchdistill's usual loop; records the indices each step trained."""
    for epoch in epochs:
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            trained.append(supp_dict[td.INDEX_KEY].tolist())
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        box.post_epoch_process()


def _per_epoch(trained: list[list[int]], sampler) -> list[int]:
    steps = sampler.steps_per_epoch()
    out, k = [], 0
    for s in steps:
        out.append(sum(len(b) for b in trained[k : k + s]))
        k += s
    assert k == len(trained)
    return out


def test_keys_are_registered() -> None:
    assert get_batch_sampler(td.BATCH_SAMPLER_KEY) is td.TorchdistillKCDBatchSampler
    assert get_dataset_wrapper(td.DATASET_WRAPPER_KEY) is td.KCDIndexWrapper
    assert get_forward_proc_func(td.FORWARD_KEY) is td.kcd_forward
    assert get_post_forward_proc_func(td.POST_FORWARD_KEY) is td.kcd_post_forward


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epochs_train_the_schedule_and_every_batch_is_observed(num_workers: int) -> None:
    box = _box(_train_config(num_workers=num_workers))
    sampler = td.kcd_batch_sampler(box)
    assert sampler.loader.shuffle and sampler.loader.seed == 7  # RandomSampler: shuffled epochs
    trained: list[list[int]] = []
    _train(box, range(box.num_epochs), trained)
    assert _per_epoch(trained, sampler) == SIZES
    loader = sampler.loader
    assert loader.epoch == SCHED["epochs"]  # the loader ended where the schedule ends
    assert [h["epoch"] for h in loader.history] == list(CondensationSchedule(**SCHED).condensation_epochs)
    assert int(loader.bank.counts.sum()) == sum(SIZES)  # kcd_post_forward observed every batch once


def test_value_kl_scores_with_the_teachers_logits() -> None:
    config = _train_config()
    config["train_data_loader"]["batch_sampler"]["kwargs"]["value"] = "kl"
    config["teacher"]["forward_proc"] = td.FORWARD_KEY
    box = _box(config)
    trained: list[list[int]] = []
    _train(box, range(box.num_epochs), trained)
    loader = td.kcd_batch_sampler(box).loader
    assert _per_epoch(trained, td.kcd_batch_sampler(box)) == SIZES and loader.epoch == SCHED["epochs"]
    assert int(loader.bank.counts.sum()) == sum(SIZES)
    config["teacher"]["forward_proc"] = "forward_batch_only"  # no teacher logits recorded: refused before the step
    box = _box(config)
    before = [p.detach().clone() for p in box.student_model.parameters()]
    x, y, supp = next(iter(box.train_data_loader))
    with pytest.raises(RuntimeError, match="value: kl needs the teacher's logits: set the teacher's forward_proc"):
        box.post_forward_process(loss=box.forward_process(x, y, supp))
    assert all(torch.equal(a, b) for a, b in zip(before, box.student_model.parameters(), strict=True))


def test_checkpoint_beside_torchdistills_resumes_exactly(tmp_path) -> None:
    ref = _box()
    ref_trained: list[list[int]] = []
    _train(ref, range(SCHED["epochs"]), ref_trained)

    first = _box()
    first_trained: list[list[int]] = []
    _train(first, range(2), first_trained)  # stop after epoch 1 (the condensation before epoch 2 is done)
    ckpt = tmp_path / "ckpt" / "student.pt"
    save_ckpt(first.student_model, first.optimizer, first.lr_scheduler, 0.0, None, str(ckpt))
    assert td.save_kcd_state(first, ckpt) == str(ckpt) + ".kcd"

    resumed = _box()
    load_ckpt(str(ckpt), model=resumed.student_model, optimizer=resumed.optimizer)
    start = td.load_kcd_state(resumed, ckpt)
    assert start == 2
    rest: list[list[int]] = []
    _train(resumed, range(start, resumed.num_epochs), rest)
    assert first_trained + rest == ref_trained
    for a, b in zip(ref.student_model.parameters(), resumed.student_model.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = td.kcd_batch_sampler(ref).state_dict(), td.kcd_batch_sampler(resumed).state_dict()
    assert torch.equal(sa["bank"]["sums"], sb["bank"]["sums"]) and sa["history"] == sb["history"]
    assert torch.equal(td.kcd_batch_sampler(ref).loader.images, td.kcd_batch_sampler(resumed).loader.images)
    with pytest.raises(FileNotFoundError, match=r"no KCD loader state at '.*other\.pt\.kcd'"):
        td.load_kcd_state(resumed, tmp_path / "other.pt")


def test_distributed_sampler_set_epoch_is_the_loaders(tmp_path) -> None:
    """torchdistill's pre-epoch step calls batch_sampler.sampler.set_epoch under DDP (a
    one-rank gloo group here; examples/torchdistill_kd.py runs two ranks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        box = _box(distributed=True)
        sampler = td.kcd_batch_sampler(box)
        assert isinstance(sampler.sampler, DistributedSampler) and sampler.loader.distributed
        assert sorted(sampler.sampler) == sorted(sampler.loader.rank_indices.tolist())
        trained: list[list[int]] = []
        _train(box, range(box.num_epochs), trained)
        assert _per_epoch(trained, sampler) == SIZES and sampler.sampler.epoch == SCHED["epochs"] - 1
        assert sampler.loader.epoch == SCHED["epochs"]
    finally:
        dist.destroy_process_group()


def test_misconfigurations_name_the_yaml_entry() -> None:
    bad = _train_config()
    bad["train_data_loader"]["sampler"]["kwargs"] = {"replacement": True}
    with pytest.raises(ValueError, match=r"RandomSampler\(replacement=True, num_samples=None\)"):
        _box(bad)
    bad = _train_config()
    del bad["train_data_loader"]["dataset_wrapper"]  # torchdistill's own wrapper: no index in supp_dict
    box = _box(bad)
    x, y, supp = next(iter(box.train_data_loader))
    with pytest.raises(KeyError, match="dataset_wrapper: {key: kcd_dataset_wrapper}"):
        box.forward_process(x, y, supp)
    bad = _train_config()
    bad["student"]["forward_proc"] = "forward_batch_only"
    box = _box(bad)
    x, y, supp = next(iter(box.train_data_loader))
    with pytest.raises(RuntimeError, match="needs forward_proc: kcd_forward"):
        box.post_forward_process(loss=box.forward_process(x, y, supp))
    bad = _train_config()
    del bad["train_data_loader"]["batch_sampler"]
    with pytest.raises(TypeError, match="has batch_sampler BatchSampler, not KCD's"):
        td.kcd_batch_sampler(_box(bad))
    bad = _train_config()
    bad["train_data_loader"]["batch_sampler"]["kwargs"]["schedule"] = {"epochs": 4, "periods": 2}
    with pytest.raises(TypeError, match=r"schedule \{'epochs': 4, 'periods': 2\} is not CondensationSchedule"):
        _box(bad)


def test_import_works_around_torchvision_order() -> None:
    """In a fresh interpreter torchdistill 1.1.5's dataset registry raises KeyError:
    'torchvision.datasets' unless that module was imported first; the integration does it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, kcd_fast.integrations.torchdistill\n"
        "from torchdistill.datasets.registry import get_batch_sampler\n"
        "print(get_batch_sampler('kcd_batch_sampler').__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "TorchdistillKCDBatchSampler"
