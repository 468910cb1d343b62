"""The KD trainer, models, teacher cache and the throughput/digits benchmarks on tiny runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bench_modules import load_benchmark

from kcd_fast import ArrayDataset, CondensationSchedule, KCDLoader
from kcd_fast.kd import (
    BatchPreprocess,
    KDConfig,
    KDTrainer,
    build_model,
    cached_teacher,
    count_parameters,
    digits_arrays,
    epoch_lr_factor,
    full_schedule,
    kd_loss,
    keep_uint8,
    lr_factor,
    make_eval_loader,
    make_loader,
    split_arrays,
    synthetic_arrays,
)
from kcd_fast.kd.cli import main as train_main

_bench_module = load_benchmark


@pytest.fixture(scope="module")
def tiny():
    x, y = synthetic_arrays(320, image_size=16, seed=0)
    xt, yt = synthetic_arrays(120, image_size=16, seed=1)
    return x, y, xt, yt


# -- loss, LR, preprocessing ------------------------------------------------------------------
def test_kd_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    loss, ce, kl = kd_loss(s, t, y, temperature=4.0, gamma=0.3, alpha_kd=0.7)
    pt = F.softmax(t / 4, 1)
    want_kl = (pt * (pt.log() - F.log_softmax(s / 4, 1))).sum(1).mean() * 16
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(ce, F.cross_entropy(s, y))
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kl)
    _, _, kl_same = kd_loss(s, s, y)
    assert abs(float(kl_same)) < 1e-6
    _, _, kl_none = kd_loss(s, None, y)
    assert float(kl_none) == 0.0


def test_lr_factor_schedules():
    cos = KDConfig(lr_schedule="cosine")
    assert lr_factor(0, 100, cos) == 1.0
    assert math.isclose(lr_factor(50, 100, cos), 0.5)
    assert lr_factor(100, 100, cos) == pytest.approx(0.0)
    ms = KDConfig(lr_schedule="multistep", milestones=(0.5, 0.75), lr_decay=0.1)
    assert [lr_factor(s, 100, ms) for s in (49, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])
    warm = KDConfig(warmup_steps=10)
    assert lr_factor(4, 100, warm) == pytest.approx(0.5)


def test_epoch_indexed_lr_is_the_papers_multistep_and_the_same_for_kd_and_kcd():
    # the paper's schedule: x0.1 at epochs 150, 180, 210 of 240, whatever the epoch's length
    ms = KDConfig(lr_schedule="multistep")
    for steps_in_epoch in (391, 250, 17):
        f = [epoch_lr_factor(e, 0, steps_in_epoch, 240, 10_000, ms) for e in (149, 150, 179, 180, 210, 239)]
        assert f == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.001, 0.001])
        last = epoch_lr_factor(149, steps_in_epoch - 1, steps_in_epoch, 240, 10_000, ms)
        assert last == 1.0  # still epoch 149
    cos = KDConfig()
    assert cos.lr_index == "epoch"
    assert epoch_lr_factor(3, 5, 10, 6, 100, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3.5 / 6)))
    with pytest.raises(ValueError, match="lr_index must be one of 'epoch', 'step', got 'batch'"):
        KDConfig(lr_index="batch")


def test_preprocess_normalises_and_augments_with_own_generator():
    x = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    pre = BatchPreprocess([0.5] * 3, [0.25] * 3, augment="none")
    out = pre(x, train=True)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 8, 8)
    torch.testing.assert_close(out, torch.full_like(out, (128 / 255 - 0.5) / 0.25))
    img = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8) / 1000
    state = torch.get_rng_state()
    a = BatchPreprocess([0.0] * 3, [1.0] * 3, augment="crop_flip", seed=3)(img, train=True)
    b = BatchPreprocess([0.0] * 3, [1.0] * 3, augment="crop_flip", seed=3)(img, train=True)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    torch.testing.assert_close(a, b)
    assert a.shape == img.shape and not torch.equal(a, img)
    ev = BatchPreprocess([0.0] * 3, [1.0] * 3, augment="crop_flip")(img, train=False)
    torch.testing.assert_close(ev, img)  # no augmentation at evaluation


# -- models --------------------------------------------------------------------------------------
def test_cifar_resnets_match_the_literature():
    s, t = build_model("resnet8x4", 100), build_model("resnet32x4", 100)
    # CRD / RepDistiller report 1.23M and 7.43M parameters for CIFAR-100
    assert count_parameters(s) == pytest.approx(1.23e6, rel=0.01)
    assert count_parameters(t) == pytest.approx(7.43e6, rel=0.01)
    x = torch.randn(2, 3, 32, 32)
    logits, feat = s(x, features=True)
    assert logits.shape == (2, 100) and feat.shape == (2, 256)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_model("convnet_s", 10, seed=5), build_model("convnet_s", 10, seed=5)
    c = build_model("convnet_s", 10, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    m = build_model("mlp_s", 10, (1, 8, 8))
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)


# -- loaders ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:KCD condensation before epoch")  # this test observes nothing
def test_vanilla_loader_visits_every_point_in_kcd_first_epoch_order(tiny):
    x, y, _, _ = tiny
    plain = make_loader("kd", ArrayDataset(x, y, transform=keep_uint8), epochs=2, batch_size=64, seed=3)
    assert isinstance(plain, KCDLoader) and plain.schedule == full_schedule(2)
    assert plain.schedule.condensation_epochs == [] and plain.schedule.epoch_sizes(320) == [320, 320]
    kcd = KCDLoader(
        ArrayDataset(x, y, transform=keep_uint8), CondensationSchedule(2, 1), batch_size=64, shuffle=True, seed=3
    )
    assert len(plain) == 5 and plain.total_steps() == 10 and plain.steps_per_epoch() == [5, 5]
    got = [b for b in plain]
    idx = torch.cat([b[2] for b in got])
    assert sorted(idx.tolist()) == list(range(320))
    assert torch.equal(torch.cat([b[2] for b in kcd]), idx)  # same order as KCD's first epoch
    assert torch.equal(got[0][1], torch.as_tensor(y)[got[0][2]])  # targets belong to the indices
    list(plain)
    with pytest.raises(RuntimeError, match="epochs are done"):
        iter(plain)
    assert plain.history == []


def test_vanilla_kd_scores_nothing_and_kcd_scores_every_batch(tiny):
    x, y, _, _ = tiny
    for kind, scores in (("kd", False), ("kcd", True)):
        loader = make_loader(
            kind, ArrayDataset(x[:96], y[:96], transform=keep_uint8), epochs=2, period=1, batch_size=32, seed=0
        )
        trainer = KDTrainer(
            build_model("convnet_s", 10, (3, 16, 16)), None, loader, KDConfig(), preprocess=BatchPreprocess.cifar()
        )
        rec = trainer.train_epoch()
        assert trainer.scores is scores
        counts = loader.bank.counts
        assert (counts is not None and int(counts.sum()) == 96) if scores else (counts is None)
        assert (rec.observe_s > 0) is scores


# -- the trainer -----------------------------------------------------------------------------------
def _teacher(tiny, cache):
    x, y, xt, yt = tiny
    return cached_teacher(
        "convnet_s",
        ArrayDataset(x, y, transform=keep_uint8),
        num_classes=10,
        input_shape=(3, 16, 16),
        config=KDConfig(gamma=1.0, alpha_kd=0.0),
        epochs=2,
        batch_size=64,
        preprocess=BatchPreprocess.cifar(),
        test_set=ArrayDataset(xt, yt, transform=keep_uint8),
        cache_dir=cache,
        seed=1,
    )


def test_teacher_cache_roundtrip(tiny, tmp_path):
    t1, info1 = _teacher(tiny, tmp_path)
    t2, info2 = _teacher(tiny, tmp_path)
    assert not info1["cached"] and info2["cached"] and info1["key"] == info2["key"]
    assert info2["accuracy"] == info1["accuracy"]
    for a, b in zip(t1.state_dict().values(), t2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(list(tmp_path.glob("teacher-convnet_s-*.pt"))) == 1


def test_vanilla_and_kcd_share_one_loop(tiny, tmp_path):
    x, y, xt, yt = tiny
    teacher, _ = _teacher(tiny, tmp_path)
    test_loader = make_eval_loader(ArrayDataset(xt, yt, transform=keep_uint8))
    results = {}
    for kind in ("kd", "kcd"):
        loader = make_loader(
            kind, ArrayDataset(x, y, transform=keep_uint8), epochs=6, period=2, rho=0.5, batch_size=32, seed=0
        )
        cfg = KDConfig(lr=0.05)  # cosine over epoch progress: the same LR in every epoch of both runs
        trainer = KDTrainer(
            build_model("convnet_s", 10, (3, 16, 16), seed=0),
            teacher,
            loader,
            cfg,
            preprocess=BatchPreprocess.cifar(seed=0),
            test_loader=test_loader,
            name=kind,
        )
        assert trainer.total_steps == loader.total_steps()
        results[kind] = trainer.fit()
        assert trainer.step == loader.total_steps()
    kd, kcd = results["kd"], results["kcd"]
    sizes = CondensationSchedule(6, 2, rho=0.5).epoch_sizes(320)
    assert [e.samples for e in kd.epochs] == [320] * 6
    assert [e.samples for e in kcd.epochs] == sizes
    assert len(kcd.history) == len(CondensationSchedule(6, 2, rho=0.5).condensation_epochs)
    assert kd.history == []
    # identical until the first condensation: same init, batches, order, augmentation and LR
    assert kd.epochs[0].loss == kcd.epochs[0].loss
    assert kd.to_dict()["epoch_lr"] == kcd.to_dict()["epoch_lr"]
    assert kd.epochs[0].lr_start == 0.05 and kd.epochs[-1].lr_start < 0.05
    for r in (kd, kcd):
        assert r.epochs[-1].loss < r.epochs[0].loss  # the loss falls
        assert r.accuracy is not None and 0.0 <= r.accuracy <= 100.0
        assert all(e.seconds > 0 and e.observe_s >= 0 and e.epoch_end_s >= 0 for e in r.epochs)
    d = kcd.to_dict()
    for key in ("seconds", "accuracy", "epoch_samples", "epoch_seconds", "observe_s", "history"):
        assert key in d


class _ProjectedMSE(torch.nn.Module):
    """A feature loss with parameters: MSE between a projected student embedding and the teacher's."""

    def __init__(self, d_s: int, d_t: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_s, d_t)

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.proj(feat_s.float()), feat_t.float())


def test_feature_loss_hook_trains_its_parameters(tiny):
    x, y, _, _ = tiny
    teacher = build_model("convnet_t", 10, (3, 16, 16), seed=1)
    feat_loss = _ProjectedMSE(64, 128)
    loader = make_loader("kd", ArrayDataset(x[:64], y[:64], transform=keep_uint8), epochs=1, batch_size=32)
    trainer = KDTrainer(
        build_model("convnet_s", 10, (3, 16, 16)),
        teacher,
        loader,
        KDConfig(beta=1.0),
        preprocess=BatchPreprocess.cifar(),
        feature_loss=feat_loss,
    )
    before = feat_loss.proj.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, feat_loss.proj.weight)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr must be"),
        ({"temperature": 0}, "temperature must be"),
        ({"lr_schedule": "poly"}, "lr_schedule must be one of"),
        ({"amp": "fp8"}, "amp must be one of"),
        ({"milestones": (1.5,)}, "milestones must be"),
        ({"warmup_steps": -1}, "warmup_steps must be"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDConfig(**kwargs)


def test_bad_arguments_name_the_value(tiny):
    x, y, _, _ = tiny
    with pytest.raises(ValueError, match="model must be one of .* got 'resnet9000'"):
        build_model("resnet9000", 10)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        build_model("convnet_s", 1)
    with pytest.raises(ValueError, match="augment must be one of .* got 'mixup'"):
        BatchPreprocess([0.5], [0.25], augment="mixup")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        make_loader("kd", ArrayDataset(x, y), epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        synthetic_arrays(0)
    with pytest.raises(ValueError, match="kind must be 'kd' or 'kcd', got 'unix'"):
        make_loader("unix", ArrayDataset(x, y), epochs=1)
    loader = make_loader("kd", ArrayDataset(x, y), epochs=1)
    with pytest.raises(ValueError, match="beta = 0.5 needs a feature_loss"):
        KDTrainer(build_model("convnet_s", 10), None, loader, KDConfig(beta=0.5), preprocess=BatchPreprocess.cifar())
    with pytest.raises(TypeError, match="loader must be a KCDLoader"):
        KDTrainer(build_model("convnet_s", 10), None, [1, 2], KDConfig(), preprocess=BatchPreprocess.cifar())


def test_data_helpers(tmp_path):
    x, y = digits_arrays()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.uint8 and y.max() == 9
    xtr, ytr, xte, yte = split_arrays(x, y, 0.25, seed=0)
    assert xtr.shape[0] + xte.shape[0] == 1797 and set(np.unique(yte)) == set(range(10))
    a, la = synthetic_arrays(50, seed=4)
    b, lb = synthetic_arrays(50, seed=4)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    from kcd_fast.kd import load_arrays

    np.savez(tmp_path / "d.npz", images=a, labels=la)
    xtr, ytr, xte, yte = load_arrays(tmp_path / "d.npz", test_fraction=0.2)
    assert xtr.shape[0] + xte.shape[0] == 50
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_arrays(tmp_path / "missing.npz")
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(a[i]).save(tmp_path / "folder" / c / f"{i}.png")
    xtr, ytr, xte, yte = load_arrays(tmp_path / "folder", image_size=16, test_fraction=0.2)
    assert xtr.shape == (8, 16, 16, 3) and xte.shape == (2, 16, 16, 3) and sorted(set(ytr)) == [0, 1]


# -- command lines ---------------------------------------------------------------------------------
def test_throughput_benchmark_writes_json_and_plot(tmp_path):
    bench = _bench_module("throughput")
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    r = bench.run(
        [
            "--device",
            "cpu",
            "--n-train",
            "200",
            "--n-test",
            "100",
            "--image-size",
            "16",
            "--epochs",
            "4",
            "--period",
            "2",
            "--teacher",
            "convnet_s",
            "--student",
            "convnet_s",
            "--teacher-epochs",
            "1",
            "--batch-size",
            "50",
            "--cache-dir",
            str(tmp_path),
            "--no-progress",
            "--repeats",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    data = json.loads(out_json.read_text())
    for key in ("theoretical_C", "paper_C", "measured_ratio", "vanilla", "kcd", "machine", "overhead"):
        assert key in data
    for run in ("vanilla", "kcd"):
        for key in ("seconds", "accuracy", "epoch_samples", "epoch_seconds"):
            assert key in data[run]
    sched = CondensationSchedule(4, 2, rho=0.7)
    assert data["kcd"]["epoch_samples_expected"] == sched.epoch_sizes(200) == data["kcd"]["epoch_samples"]
    assert data["theoretical_C"] == pytest.approx(sched.relative_cost(200))
    assert data["paper_C"] == pytest.approx(sched.paper_cost)
    assert data["machine"]["cpu_count"] >= 1 and "torch" in data["machine"]
    runs = data["measured_ratio_runs"]
    assert len(runs) == 2 == len(data["runs"]) and data["repeats"] == 2
    assert r["measured_ratio"] == pytest.approx(sum(runs) / 2)  # the median of two
    for i, run in enumerate(data["runs"]):
        assert run["measured_ratio"] == pytest.approx(run["kcd"]["seconds"] / run["vanilla"]["seconds"]) == runs[i]
        assert run["vanilla"]["epoch_lr"] == run["kcd"]["epoch_lr"]  # epoch-indexed: the same LR every epoch
    assert data["measured_ratio_spread"] == [min(runs), max(runs)]
    assert out_png.stat().st_size > 1000
    # the verdict says what was measured against what, one-sided
    assert data["goal_within_0.02"] == (data["measured_ratio"] <= data["theoretical_C"] + 0.02)
    assert data["verdict"].startswith(f"KCD took {data['measured_ratio']:.3f} of vanilla KD's wall-clock time")
    assert f"C = {data['theoretical_C']:.3f}" in data["verdict"] and "the 2 pairs ranged" in data["verdict"]


@pytest.mark.parametrize(
    "measured, phrase",
    [(0.70, "below C, faster than its sample count predicts"), (0.83, "within 0.02 of C"), (0.90, "above C")],
)
def test_throughput_verdict_is_one_sided(measured: float, phrase: str) -> None:
    v = _bench_module("throughput").verdict(measured, 0.82, 0.6, 0.95, 3)
    assert phrase in v and "the 3 pairs ranged 0.600-0.950" in v, v


def test_trainer_logs_plain_progress_lines_without_a_bar(tiny) -> None:
    x, y, xt, yt = tiny
    lines: list[str] = []
    loader = make_loader("kcd", ArrayDataset(x, y, transform=keep_uint8), epochs=2, period=1, batch_size=64)
    student = build_model("convnet_s", 10, (3, 16, 16), seed=0)
    pre = BatchPreprocess([0.5] * 3, [0.25] * 3, augment="none")
    KDTrainer(student, None, loader, KDConfig(), preprocess=pre, log=lines.append, log_every=1e-9, name="s").fit()
    heartbeats = [line for line in lines if " batch " in line]
    assert heartbeats and all(line.startswith("s epoch ") for line in heartbeats), lines
    epochs = [line for line in lines if line.startswith(("s epoch 1/2:", "s epoch 2/2:"))]
    assert len(epochs) == 2 and "left" in epochs[0] and "left" not in epochs[1], lines
    with pytest.raises(ValueError, match=r"log_every must be a number of seconds > 0, got 0"):
        KDTrainer(student, None, loader, KDConfig(), preprocess=pre, log=print, log_every=0)
    with pytest.raises(TypeError, match=r"log must be a callable .* got str"):
        KDTrainer(student, None, loader, KDConfig(), preprocess=pre, log="stderr")


def test_throughput_writes_into_its_output_folder_by_default_with_the_tensor_back_end(tmp_path, capsys):
    bench = _bench_module("throughput")
    args = ["--device", "cpu", "--n-train", "120", "--n-test", "60", "--image-size", "16", "--epochs", "2"]
    args += ["--period", "1", "--teacher", "convnet_s", "--student", "convnet_s", "--teacher-epochs", "1"]
    args += ["--batch-size", "40", "--cache-dir", str(tmp_path), "--backend", "tensor", "--out", str(tmp_path / "o")]
    r = bench.run(args)
    written = sorted(p.suffix for p in (tmp_path / "o").iterdir())
    assert written == [".json", ".png"]
    assert r["config"]["backend"] == "tensor" and r["feed"]["backend"] == "tensor"
    assert "\x1b[" not in capsys.readouterr().err  # no progress bars when stderr is no terminal


def test_digits_benchmark_and_train_cli(tmp_path):
    digits = _bench_module("digits_accuracy")
    r = digits.run(
        [
            "--seeds",
            "2",
            "--epochs",
            "4",
            "--period",
            "2",
            "--teacher-epochs",
            "2",
            "--cache-dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "d.json"),
        ]
    )
    assert len(r["per_seed"]) == 2 and "mean" in r["kcd"] and "std" in r["vanilla"]
    assert json.loads((tmp_path / "d.json").read_text())["paired_delta"]["mean"] == pytest.approx(
        r["paired_delta"]["mean"]
    )
    out = train_main(
        [
            "--data",
            "digits",
            "--mode",
            "both",
            "--epochs",
            "4",
            "--period",
            "2",
            "--teacher-epochs",
            "2",
            "--batch-size",
            "64",
            "--cache-dir",
            str(tmp_path),
            "--no-progress",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "cli.json"),
        ]
    )
    assert out["kd"]["samples"] == 4 * out["kd"]["epoch_samples"][0]
    assert out["kcd"]["samples"] < out["kd"]["samples"]
    assert (tmp_path / "cli.json").exists()


@pytest.mark.needs_cuda
def test_trainer_on_cuda_uses_bf16_and_channels_last(tiny):
    x, y, xt, yt = tiny
    teacher = build_model("convnet_t", 10, (3, 16, 16), seed=1)
    loader = make_loader(
        "kcd", ArrayDataset(x, y, transform=keep_uint8), epochs=4, period=2, batch_size=64, pin_memory=True
    )
    trainer = KDTrainer(
        build_model("convnet_s", 10, (3, 16, 16)),
        teacher,
        loader,
        KDConfig(),
        preprocess=BatchPreprocess.cifar(),
        device="cuda",
        test_loader=make_eval_loader(ArrayDataset(xt, yt, transform=keep_uint8)),
    )
    assert trainer.amp_dtype is torch.bfloat16 and trainer.channels_last
    res = trainer.fit()
    assert [e.samples for e in res.epochs] == CondensationSchedule(4, 2).epoch_sizes(320)
    assert loader.bank.device.type == "cuda" and res.accuracy is not None
