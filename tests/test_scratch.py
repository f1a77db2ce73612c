"""Scratch directories of killed processes are removed before a new write."""

import os
import subprocess
import sys

import pytest

from fed_unlearn.scratch import remove_stale_parts, scratch_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no such process any more


def test_stale_parts_of_dead_processes_go_live_ones_stay(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    stale = tmp_path / f"fl-abc.part{dead}"
    (stale / "history").mkdir(parents=True)
    live = tmp_path / f"fl-def.part{me}"
    live.mkdir()
    parent_pid = tmp_path / f"fl-ghi.part{os.getppid()}"  # a live process
    parent_pid.mkdir()
    keep = [tmp_path / "fl-abc", tmp_path / "fl-x.partial", tmp_path / "notes.part"]
    for p in keep:
        p.mkdir()
    assert remove_stale_parts(tmp_path) == [stale]
    assert not stale.exists()
    assert live.exists() and parent_pid.exists() and all(p.exists() for p in keep)
    assert remove_stale_parts(tmp_path / "missing") == []


def test_scratch_dir_is_fresh_and_cleans_its_parent(tmp_path):
    final = tmp_path / "fl-key"
    old = tmp_path / f"fl-other.part{_dead_pid()}"
    old.mkdir()
    mine = tmp_path / f"fl-key.part{os.getpid()}"
    (mine / "leftover").mkdir(parents=True)
    tmp = scratch_dir(final)
    assert tmp == mine and not tmp.exists()  # this process's earlier try is gone
    assert not old.exists()


@pytest.mark.slow
def test_fl_killed_mid_run_leaves_nothing_used_and_the_same_command_redoes_it(tmp_path):
    """kill -9 of `fed-unlearn train` after its first FL round is in the history:
    no FL phase is published, and the same command computes the phase anew (the
    half-written one is neither used nor left behind) and publishes it."""
    import json
    import signal
    import time

    from helpers import ROOT, run_cli

    runs = tmp_path / "runs"
    args = ["train", "--preset", "tiny", "--clients", "2", "--depart", "1"]
    args += ["--rounds", "3", "--quiet"]
    env = {**os.environ, "FED_UNLEARN_RUNS": str(runs)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", *args, "--out", str(tmp_path / "a")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not list(runs.glob("fl-*.part*/history/round_0001")):
            assert proc.poll() is None, "the run ended before its first round"
            assert time.time() < deadline, "no FL round after 10 minutes"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert list(runs.glob("fl-*.part*"))  # the half-written phase
    assert not [p for p in runs.glob("fl-*") if ".part" not in p.name]
    run_cli([*args, "--out", str(tmp_path / "b")], runs)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["cached"]["train"] is False and run["rounds"]["train"] == 3
    assert not list(runs.glob("fl-*.part*"))  # removed, not reused
    (phase,) = [p for p in runs.glob("fl-*") if ".part" not in p.name]
    assert json.loads((phase / "phase.json").read_text())["rounds"] == 3
