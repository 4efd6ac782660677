"""Workers die with the bench (issue 16 item 5), and a killed bench resumes to the uninterrupted table."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rankwise.bench.lifeline as lifeline

LIFELINE = Path(lifeline.__file__)
SRC = str(Path(lifeline.__file__).parents[2])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


CHILD = f"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("lifeline", {str(LIFELINE)!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod.die_with_parent(int(sys.argv[1]))
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_when_its_parent_is_killed(tmp_path):
    armed = tmp_path / "armed"
    parent = subprocess.Popen([sys.executable, "-c",
                               "import os, subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {CHILD!r}, str(os.getpid()), "
                               f"{str(armed)!r}])\n"
                               "time.sleep(120)"])
    try:
        end = time.monotonic() + 30
        while not (armed.exists() and armed.read_text()) and time.monotonic() < end:
            time.sleep(0.02)
        child = int(armed.read_text())
        assert _alive(child)
        parent.kill()
        parent.wait()
        assert _wait_dead(child), "the worker outlived its killed parent"
    finally:
        parent.kill()


def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    not_parent = os.getpid() + 10**6
    proc = subprocess.run([sys.executable, "-c", CHILD, str(not_parent), os.devnull], timeout=30)
    assert proc.returncode == 1


def _bench(out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "rankwise", "bench", "--methods", "full,lowrank:rank=8", "--seeds", "1",
            "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "2", "--out", str(out)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _ppl(out: Path) -> dict[str, str]:
    return {r["group"]: r["ppl_mean"] for r in csv.DictReader((out / "summary.csv").open())}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_bench_leaves_no_orphan_and_resumes_to_the_same_table(tmp_path):
    out = tmp_path / "killed"
    pid_file = out / "runs" / "lowrank_rank_8" / "default" / "seed0" / "worker.pid"
    bench = _bench(out)
    try:
        end = time.monotonic() + 300
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < end:
            time.sleep(0.02)
        worker = int(pid_file.read_text())  # the second run's worker: the first run has finished
        assert _alive(worker)
        bench.send_signal(signal.SIGKILL)
        bench.wait()
        assert _wait_dead(worker), "the bench's worker outlived it"
    finally:
        bench.kill()
    assert (out / "runs" / "full" / "default" / "seed0" / "result.json").exists()
    assert not (out / "runs" / "lowrank_rank_8" / "default" / "seed0" / "result.json").exists()
    rerun = _bench(out)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log
    assert "resuming: 1 of 2 runs already finished" in log
    straight = _bench(tmp_path / "straight")
    straight.communicate(timeout=600)
    assert straight.returncode == 0
    assert _ppl(out) == _ppl(tmp_path / "straight")
