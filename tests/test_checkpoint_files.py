"""Checkpoint files left by killed writers: every save removes the temporary files of its
target that no live writer holds (kcd_fast.checkpoint.remove_stale_temporaries).

The writers are real processes, SIGKILLed while they hold a written, fsync-pending
temporary file (4 MiB each): one helper process imports kcd_fast once and forks them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kcd_fast import ArrayDataset, KCDLoader
from kcd_fast import checkpoint as ckpt

fcntl = pytest.importorskip("fcntl")

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import SCHED, loader_kwargs, make_data, trained  # noqa: E402

# Forks argv[2] writers; each writes 4 MiB to a temporary file of argv[1] with atomic_write,
# then blocks in the fsync (holding its flock) and waits to be killed. Prints "ready <pid>"
# per writer, "reaped <pid>" per writer that died.
WRITERS = r"""
import os, sys, time
from kcd_fast import checkpoint
path, count = sys.argv[1], int(sys.argv[2])
for _ in range(count):
    pid = os.fork()
    if pid == 0:
        def stuck(fd):
            os.write(1, f"ready {os.getpid()}\n".encode())  # one write: lines of concurrent writers never mix
            time.sleep(120)
            os._exit(3)
        os.fsync = stuck
        checkpoint.atomic_write(path, b"x" * (4 << 20))
        os._exit(4)
for _ in range(count):
    pid, _status = os.wait()
    os.write(1, f"reaped {pid}\n".encode())
"""


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "kcd.ckpt")


def _read(proc: subprocess.Popen[str], word: str, count: int, deadline: float) -> list[int]:
    pids, other = [], []
    while len(pids) < count:
        assert time.monotonic() < deadline, f"the writers did not report {count} x {word!r} in time: {other}"
        line = proc.stdout.readline()
        assert line, f"the writer process ended: {proc.stderr.read()}; other output: {other}"
        parts = line.split()
        if len(parts) == 2 and parts[0] == word and parts[1].isdigit():
            pids.append(int(parts[1]))
        elif not (len(parts) == 2 and parts[0] in ("ready", "reaped")):
            other.append(line)  # anything else a library printed: not ours
    return pids


@pytest.mark.timeout(120)
def test_ten_killed_saves_then_one_clean_save_leave_only_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "kcd.ckpt"
    loader, _ = trained(2)
    loader.save(path)
    n_killed = 10
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITERS, str(path), str(n_killed + 1)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        pids = _read(proc, "ready", n_killed + 1, deadline)
        names = _temporaries(tmp_path)
        assert len(names) == n_killed + 1 and all(n.startswith(".kcd.ckpt.") and n.endswith(".tmp") for n in names)
        assert ckpt.remove_stale_temporaries(path) == []  # every writer is alive: nothing is removed
        *killed, alive = pids
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert sorted(_read(proc, "reaped", n_killed, deadline)) == sorted(killed)
        assert len(_temporaries(tmp_path)) == n_killed + 1  # the killed saves' files stay until the next save
        (tmp_path / ".other.ckpt.0123456789ab.tmp").write_bytes(b"not ours")  # another target's pattern
        (tmp_path / ".kcd.ckpt.tmp").write_bytes(b"not ours")  # not the pattern

        loader.save(path)  # one clean save
        left = _temporaries(tmp_path)
        assert ".other.ckpt.0123456789ab.tmp" in left and ".kcd.ckpt.tmp" in left
        ours = [n for n in left if n not in (".other.ckpt.0123456789ab.tmp", ".kcd.ckpt.tmp")]
        assert len(ours) == 1  # the live writer's file is left alone
        os.kill(alive, signal.SIGKILL)
        assert _read(proc, "reaped", 1, deadline) == [alive]
        (tmp_path / ".other.ckpt.0123456789ab.tmp").unlink()
        (tmp_path / ".kcd.ckpt.tmp").unlink()

        loader.save(path)
        assert [p.name for p in tmp_path.iterdir()] == ["kcd.ckpt"]  # only the checkpoint
        back = KCDLoader.load(path, ArrayDataset(*make_data(60)), SCHED, **loader_kwargs())
        assert back.epoch == 2
    finally:
        proc.kill()
        proc.wait(timeout=30)
