"""The image-folder overlay's storage (kcd_fast/loader/backends/dali_overlay.py, no DALI needed):
lossless formats read back the blend exactly, JPEG within a tolerance and at about a photo's
size, the memory budget spills to a private directory that goes with the overlay, replays
give the same bytes; with ``overlay_dir``: content-addressed files reused on resume (also
after a crashed process), removed by their last user, and split between 2 gloo ranks that
share the directory (not split when they do not)."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from kcd_fast.data.folders import load_rgb
from kcd_fast.loader.backends.dali_overlay import FolderOverlay


def _photos(root: Path, n: int = 12, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus fine texture), 60..90 x 50..80 pixels."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(50, 80, 1).tolist() + rng.integers(60, 90, 1).tolist())
        base = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        img = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        p = root / f"{i}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(str(p))
    return paths


LOG = [
    {
        "epoch": 1,
        "dst": torch.tensor([1, 4, 7]),
        "src": torch.tensor([9, 10, 11]),
        "eps": torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64),
    },
    {
        "epoch": 2,
        "dst": torch.tensor([9, 2]),
        "src": torch.tensor([1, 3]),
        "eps": torch.tensor([0.85, 0.7], dtype=torch.float64),
    },
]  # the second summary reads point 1, which the first summarised


def _reference(paths: list[str]) -> dict[int, np.ndarray]:
    cur: dict[int, np.ndarray] = {}
    for s in LOG:
        new = {}
        for d, r, e in zip(s["dst"].tolist(), s["src"].tolist(), s["eps"].tolist(), strict=True):
            a = cur.get(d, np.asarray(load_rgb(paths[d])))
            b = cur.get(r, np.asarray(load_rgb(paths[r])))
            if b.shape != a.shape:
                b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))
            new[d] = np.clip(np.floor(e * a.astype(np.float64) + (1 - e) * b.astype(np.float64) + 0.5), 0, 255)
        cur.update({k: v.astype(np.uint8) for k, v in new.items()})
    return cur


def test_lossless_formats_read_back_the_blend_exactly(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    want = _reference(paths)
    for fmt in ("pnm", "png"):
        ov = FolderOverlay(paths, overlay_format=fmt, num_threads=2)
        ov.sync(LOG)
        assert ov.points == sorted(want)
        for i in want:
            np.testing.assert_array_equal(ov.image(i), want[i])


def test_jpeg_is_close_to_the_blend_and_about_a_photos_size(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    want = _reference(paths)
    ov = FolderOverlay(paths, overlay_format="jpeg", num_threads=2)
    ov.sync(LOG)
    for i in want:
        err = np.abs(ov.image(i).astype(int) - want[i].astype(int))
        assert err.mean() < 2.0 and err.max() <= 40, (i, err.mean(), err.max())
    src_bytes = np.mean([os.path.getsize(paths[i]) for i in want])
    per_point = ov.nbytes / len(want)
    assert per_point <= 2.5 * src_bytes  # about the size of the photos they replace (PPM: ~7x)
    again = FolderOverlay(paths, overlay_format="jpeg")
    again.sync(LOG)  # a replay (resume) gives the same bytes: the encoder is deterministic
    assert all(np.array_equal(again.entries[i], ov.entries[i]) for i in want)


def test_memory_budget_spills_to_a_private_directory_that_goes_with_the_overlay(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    want = _reference(paths)
    ov = FolderOverlay(paths, overlay_format="pnm", budget=30_000)
    ov.sync(LOG)
    assert ov.memory_bytes <= 30_000 and ov.directory is not None
    files = os.listdir(ov.directory)
    assert files and ov.nbytes == ov.memory_bytes + sum(os.path.getsize(os.path.join(ov.directory, f)) for f in files)
    for i in want:
        np.testing.assert_array_equal(ov.image(i), want[i])  # the same pixels, in memory or in a file
    folder = ov.directory
    del ov
    gc.collect()
    assert not os.path.exists(folder)  # owned and removed
    with pytest.raises(ValueError, match=r"dali_overlay_budget\) must be an int >= 0 \(bytes\), got -1"):
        FolderOverlay(paths, budget=-1)
    with pytest.raises(ValueError, match=r"dali_overlay_format\) must be 'pnm', 'png' or 'jpeg', got 'webp'"):
        FolderOverlay(paths, overlay_format="webp")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(OSError, match=r"dali_overlay_dir\) '.*a-file' cannot hold the overlay's files"):
        FolderOverlay(paths, overlay_dir=not_a_dir)


def test_scale_benchmark_reports_bytes_rates_and_the_imagenet_extrapolation(tmp_path: Path) -> None:
    import json

    from bench_modules import load_benchmark

    scale = load_benchmark("scale")
    out = tmp_path / "scale.json"
    before = os.environ.get("KCD_FAST_NO_TORCHCODEC")
    r = scale.main(["--k", "30", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["k"] == 30 and set(data["formats"]) == {"jpeg", "pnm"}
    for f in data["formats"].values():
        assert f["summarised_points"] > 0 and f["bytes_per_point"] > 0 and f["pairs_per_s_per_core"] > 0
    # lossless PPM is several times the JPEG it replaces; the JPEG overlay is not
    assert (
        data["formats"]["pnm"]["bytes_per_point_over_source_jpeg"]
        > 2 * data["formats"]["jpeg"]["bytes_per_point_over_source_jpeg"]
    )
    e = r["imagenet_extrapolation"]
    assert e["summarised_points_at_most"] == sum(e["pairs_per_condensation"]) > 0
    assert (
        set(data["stages_ms_one_thread"])
        == {"decode_two", "decode_two_pillow", "resize", "resize_pillow", "blend", "encode_jpeg"}
        and min(data["stages_ms_one_thread"].values()) > 0
    )
    assert data["machine_speed"]["pillow_decode_ms_start"] > 0 and data["machine_speed"]["pillow_decode_ms_end"] > 0
    side = data["formats"]["jpeg"].get("codec_side_by_side_per_core")
    assert (side is not None) == data["codec"].startswith("torchcodec")
    if side is not None:
        assert len(side["torchcodec"]["runs"]) == len(side["pillow"]["runs"]) == 3
    assert os.environ.get("KCD_FAST_NO_TORCHCODEC") == before  # restored after the Pillow-only runs


def _bytes(ov: FolderOverlay) -> dict[int, bytes]:
    out = {}
    for i, v in ov.entries.items():
        out[i] = Path(v).read_bytes() if isinstance(v, str) else v.tobytes()
    return out


def test_overlay_dir_files_are_reused_by_digest_and_go_with_their_last_user(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    paths = _photos(src)
    want = _reference(paths)
    root = tmp_path / "overlay"
    ov = FolderOverlay(paths, overlay_format="pnm", overlay_dir=root, num_threads=2)
    ov.sync(LOG)
    assert ov.stats == {"pairs_made": 5, "summaries_made": 2, "summaries_reused": 0}
    assert os.path.dirname(ov.directory) == str(root) and os.path.basename(ov.directory).startswith("kcd-overlay-")
    for i in want:
        np.testing.assert_array_equal(ov.image(i), want[i])
        assert os.path.dirname(ov.entries[i]) == ov.directory

    # A second overlay of the same files and log (a resumed loader) reuses every summary; a
    # different log is built, not confused with it.
    again = FolderOverlay(paths, overlay_format="pnm", overlay_dir=root)
    again.sync(LOG)
    assert again.stats == {"pairs_made": 0, "summaries_made": 0, "summaries_reused": 2}
    assert _bytes(again) == _bytes(ov)
    other = [{**LOG[0], "eps": torch.tensor([0.9, 0.8, 0.71], dtype=torch.float64)}]
    again.sync(other)
    assert again.stats["pairs_made"] == 3 and again.points == [1, 4, 7]

    # A summary with a file missing or cut short is rebuilt (the one before it reused), the
    # same bytes; so is every summary after an original it reads is replaced in place.
    os.remove(ov.entries[9])  # written by the second summary
    third = FolderOverlay(paths, overlay_format="pnm", overlay_dir=root)
    third.sync(LOG)
    assert third.stats == {"pairs_made": 2, "summaries_made": 1, "summaries_reused": 1}
    assert _bytes(third) == _bytes(ov)
    with open(ov.entries[2], "r+b") as f:
        f.truncate(100)
    fourth = FolderOverlay(paths, overlay_format="pnm", overlay_dir=root)
    fourth.sync(LOG)
    assert fourth.stats == {"pairs_made": 2, "summaries_made": 1, "summaries_reused": 1}
    assert _bytes(fourth) == _bytes(ov)
    img = np.asarray(Image.open(paths[3]))
    Image.fromarray(255 - img).save(paths[3], quality=70)  # point 3, read by the second summary
    fifth = FolderOverlay(paths, overlay_format="pnm", overlay_dir=root)
    fifth.sync(LOG)
    assert fifth.stats == {"pairs_made": 2, "summaries_made": 1, "summaries_reused": 1}
    np.testing.assert_array_equal(fifth.image(2), _reference(paths)[2])  # the new pixels
    Image.fromarray(img).save(paths[3], quality=90)

    # Another format or file list: another directory.
    jpg = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=root)
    assert jpg.directory != ov.directory and os.path.dirname(jpg.directory) == str(root)

    # The directory goes with its last user (an entry whose lock nobody holds does not count:
    # a live holder keeps it).
    folder = ov.directory
    (Path(folder) / "users" / f"{socket.gethostname()}@1@00").write_bytes(b"")  # nobody holds its lock
    del ov, again, third, fourth, fifth
    gc.collect()
    assert not os.path.exists(folder) and os.path.isdir(jpg.directory)
    # a live user (another process holding its entry's lock) keeps it
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(Path(jpg.directory) / "users" / "another-process@2@00")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    kept = jpg.directory
    del jpg
    gc.collect()
    assert os.path.isdir(kept)
    holder.kill()
    holder.wait()


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_SH)
print("locked", flush=True)
time.sleep(120)
"""


_CRASHED = """
import os, sys, torch
from kcd_fast.loader.backends.dali_overlay import FolderOverlay
paths, root = sys.argv[1].split(","), sys.argv[2]
log = [{"epoch": 1, "dst": torch.tensor([1, 4, 7]), "src": torch.tensor([9, 10, 11]),
        "eps": torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)}]
ov = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=root)
ov.sync(log)
os._exit(0)  # killed: no clean-up runs
"""


def test_a_resumed_process_reuses_what_a_crashed_one_wrote(tmp_path: Path) -> None:
    paths = _photos(tmp_path)
    root = tmp_path / "overlay"
    subprocess.run([sys.executable, "-c", _CRASHED, ",".join(paths), str(root)], check=True, timeout=120)
    (left,) = os.listdir(root)  # the crashed process's directory stayed
    resumed = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=root)
    resumed.sync(LOG)
    assert resumed.stats == {"pairs_made": 2, "summaries_made": 1, "summaries_reused": 1}
    fresh = FolderOverlay(paths, overlay_format="jpeg")  # in memory: the same bytes
    fresh.sync(LOG)
    assert _bytes(resumed) == _bytes(fresh)
    del resumed
    gc.collect()
    assert not os.path.exists(root / left)  # the dead process's entry does not keep it


# -- two gloo ranks ---------------------------------------------------------------------------
def _rank_main(rank: int, world: int, init_file: str, out_dir: str, photos: str, mode: str) -> None:
    from kcd_fast import CondensationSchedule, ImageFolder, KCDLoader
    from kcd_fast.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        paths = sorted(str(p) for p in Path(photos).glob("*.jpg"))
        if mode == "missing" and rank == 1:
            paths[11] = paths[11] + ".gone"  # pair 2 of the first summary is rank 0's; 10 is rank 1's
            paths[10] = paths[10] + ".gone"
        root = os.path.join(out_dir, "shared" if mode != "private" else f"rank{rank}")
        ov = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=root, num_threads=1)
        ov.set_distributed(DistInfo(True, rank, world, None))
        res: dict[str, Any] = {}
        try:
            ov.sync(LOG)
            res["bytes"] = _bytes(ov)
        except (OSError, RuntimeError) as err:
            res["error"] = (type(err).__name__, str(err))
        res["stats"], res["shared"] = dict(ov.stats), ov.shared
        if mode == "shared":  # the loader wires its process group into the DALI overlay
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                pass
            else:
                folder = Path(out_dir) / "folder"
                sched = CondensationSchedule(epochs=3, period=1, rho=0.5)
                loader = KCDLoader(
                    ImageFolder(folder),
                    sched,
                    batch_size=4,
                    seed=5,
                    backend="dali",
                    dali_device=None,
                    augment="imagenet_eval",
                    num_workers=1,
                    dali_overlay_dir=os.path.join(out_dir, "loader"),
                )
                for _epoch in range(sched.epochs):
                    for x, _y, idx in loader:
                        loader.observe(idx, x.flatten(1)[:, :10] * 10)
                o = loader.backend._overlay
                log = loader.state_dict()["summaries"]
                res["loader"] = {
                    "bytes": _bytes(o),
                    "stats": dict(o.stats),
                    "shared": o.shared,
                    "pairs": [len(x["dst"]) for x in log],
                }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done with the group before it goes
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out: Path, photos: Path, mode: str) -> list[dict[str, Any]]:
    from test_distributed import spawn_ranks  # the same spawn-and-collect helper (tests/ is on sys.path)

    return spawn_ranks(world, out, photos, mode, main=_rank_main, timeout=240.0)


def _class_folder(root: Path, photos: list[str]) -> None:
    for k, p in enumerate(photos):
        d = root / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / os.path.basename(p))


def test_ranks_sharing_the_directory_split_each_summary(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    paths = sorted(_photos(photos))
    single = FolderOverlay(paths, overlay_format="jpeg")
    single.sync(LOG)
    out = tmp_path / "shared"
    out.mkdir()
    _class_folder(out / "folder", paths)
    r0, r1 = _spawn(2, out, photos, "shared")
    assert r0["shared"] is True and r1["shared"] is True
    # pairs 0, 2 of the first summary and 0 of the second on rank 0; the rest on rank 1
    assert r0["stats"]["pairs_made"] == 3 and r1["stats"]["pairs_made"] == 2
    assert r0["bytes"] == r1["bytes"] == _bytes(single)  # every rank reads all of them
    if "loader" in r0:  # DALI installed: KCDLoader's own overlay, 2 condensations
        a, b = r0["loader"], r1["loader"]
        assert a["shared"] is True and a["bytes"] == b["bytes"] and a["bytes"]
        assert len(a["pairs"]) == 2 and a["pairs"] == b["pairs"]
        assert a["stats"]["pairs_made"] == sum((p + 1) // 2 for p in a["pairs"])  # pairs 0, 2, 4, ...
        assert b["stats"]["pairs_made"] == sum(p // 2 for p in a["pairs"])


def test_ranks_with_their_own_directories_each_build_everything(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _photos(photos)
    r0, r1 = _spawn(2, tmp_path, photos, "private")
    assert r0["shared"] is False and r1["shared"] is False
    assert r0["stats"]["pairs_made"] == r1["stats"]["pairs_made"] == 5
    assert r0["bytes"] == r1["bytes"]


def test_a_rank_that_cannot_read_its_share_fails_every_rank(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _photos(photos)
    r0, r1 = _spawn(2, tmp_path, photos, "missing")
    assert r1["error"][0] == "MissingSampleError" and ".gone" in r1["error"][1]  # a FileNotFoundError
    assert r0["error"] == ("RuntimeError", "another rank failed to materialise its share of a summary; see its error")


# -- the tensor summariser (device=...): batched torchcodec decoding, torch's antialiased resize,
# the blend kernel, run here on the CPU (the GPU run is in benchmarks/gpu_check.sh) --------------
def _tensor_device_or_skip(device: str) -> None:
    from kcd_fast.loader.backends.image_codec import torchcodec_module

    if torchcodec_module() is None:
        pytest.skip("the tensor summariser needs torchcodec (pip install torchcodec)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_tensor_summariser_is_within_a_level_or_two_of_pillows_pixels(tmp_path: Path, device: str) -> None:
    _tensor_device_or_skip(device)
    paths = _photos(tmp_path)
    want = _reference(paths)
    ov = FolderOverlay(paths, overlay_format="pnm", num_threads=2, device=device)
    ov.sync(LOG)
    assert ov.points == sorted(want) and ov.stats["pairs_made"] == 5
    for i in want:
        err = np.abs(ov.image(i).astype(int) - want[i].astype(int))
        # the CPU: torch's float32 resize vs Pillow's fixed point (the second summary reads the first);
        # CUDA: nvJPEG's IDCT and upsampling differ from libjpeg's by a few levels too
        assert err.max() <= (2 if device == "cpu" else 12) and err.mean() < (0.1 if device == "cpu" else 1.5), i
    jp = FolderOverlay(paths, overlay_format="jpeg", num_threads=2, device=device)
    jp.sync(LOG)
    for i in want:
        err = np.abs(jp.image(i).astype(int) - want[i].astype(int))
        assert err.mean() < 2.5 and err.max() <= 40, (i, err.mean(), err.max())
    again = FolderOverlay(paths, overlay_format="jpeg", num_threads=1, device=device)
    again.sync(LOG)  # deterministic: a replay gives the same bytes
    assert all(np.array_equal(again.entries[i], jp.entries[i]) for i in want)


def test_tensor_summariser_files_name_their_files_and_keep_their_own_directory(tmp_path: Path) -> None:
    _tensor_device_or_skip("cpu")
    paths = _photos(tmp_path)
    store = tmp_path / "store"
    a = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=store, device="cpu")
    b = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=store)
    assert a.directory != b.directory  # other pixels, other content-addressed entry
    a.sync(LOG)
    resumed = FolderOverlay(paths, overlay_format="jpeg", overlay_dir=store, device="cpu")
    resumed.sync(LOG)
    assert resumed.stats["summaries_reused"] == 2 and resumed.stats["pairs_made"] == 0
    bad = list(paths)
    Path(bad[10]).write_bytes(Path(bad[10]).read_bytes()[:200])  # src of the first summary, cut short
    from kcd_fast.data.folders import UnreadableImageError

    for fmt in ("jpeg", "pnm"):
        ov = FolderOverlay(bad, overlay_format=fmt, device="cpu")
        with pytest.raises(UnreadableImageError, match="10.jpg"):
            ov.sync(LOG)
        assert ov.points == []  # nothing half-applied
    os.remove(bad[9])
    with pytest.raises(FileNotFoundError, match="9.jpg"):
        FolderOverlay(bad, device="cpu").sync(LOG)


def test_tensor_summariser_refuses_bad_devices_naming_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _photos(tmp_path, n=2)
    with pytest.raises(ValueError, match="device must be None or a torch device.*got 'gpu0'"):
        FolderOverlay(paths, device="gpu0")
    with pytest.raises(ValueError, match="device must be None, 'cpu' or a CUDA device, got 'meta'"):
        FolderOverlay(paths, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:0' but torch sees no CUDA device"):
            FolderOverlay(paths, device="cuda:0")
    monkeypatch.setenv("KCD_FAST_NO_TORCHCODEC", "1")
    with pytest.raises(ValueError, match=r"device='cpu': the tensor summariser .* torchcodec"):
        FolderOverlay(paths, device="cpu")
