"""A server that dies mid-unlearning resumes from its per-round unlearning log.

The in-process tests crash a method right after round k is logged (the log's
hook raises, as the pipeline's ``x-fault-kill-unlearn-round`` kills the process
there), run it again on the same log, and compare with an uninterrupted run:
the adapters must be bit-identical, the round log the same, and the rounds the
crashed run finished are not asked of the clients again.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from helpers import LeavingClients, adapter_state, full_context

from fed_unlearn import adapters as ad
from fed_unlearn.config import RunConfig
from fed_unlearn.journal import (
    KILL_ROUND_KEY,
    JournalError,
    UnlearnJournal,
)
from fed_unlearn.methods import METHOD_REGISTRY, get_method


class Crash(BaseException):
    """The server dies (not an error a method could catch)."""


def _evaluate(state):
    # a deterministic stand-in for the server-side curve evaluation
    flat = ad.flatten(state)
    return {"forget_Q_A_Prob": float(flat.sum()), "retain_Q_A_Prob": float(flat[0])}


def _run(name, options, journal=None, calls=None):
    ctx, _, _ = full_context(adapter_state())
    ctx.evaluate = _evaluate
    ctx.journal = journal
    if calls is not None:
        ctx.clients.calls = calls  # kept when the run crashes
    res = get_method(name, options).unlearn(ctx)
    return res, ctx.clients.calls


TIMINGS = {
    "eval_seconds",
    "server_step_seconds",
    "server_pre_seconds",
    "server_post_seconds",
}

#: (method, options, rounds the crash happens after): an unlearning round and,
#: where there is one, a recovery or post-training round
CASES = [
    ("mpu", {"seed": 5, "rounds": 3, "recovery_rounds": 2}, (1, 2, 4)),
    ("local_unlearn", {"rounds": 3}, (2,)),
    ("fedosd", {"unlearn_rounds": 3, "post_rounds": 2}, (2, 4)),
    ("fed_eraser", {"interval": 1}, (1,)),
    ("foul_server", {"rounds": 3, "recovery_rounds": 1}, (1, 3)),
]


@pytest.mark.parametrize(
    ("name", "options", "at"),
    [(n, o, a) for n, o, ats in CASES for a in ats],
    ids=lambda v: str(v) if not isinstance(v, dict) else "",
)
def test_crash_after_a_round_then_resume_equals_the_uninterrupted_run(
    tmp_path, name, options, at
):
    full, full_calls = _run(name, options)
    root = tmp_path / "log"
    journal = UnlearnJournal(root)
    journal.start({"config": {}})

    def crash(r):
        if r == at:
            raise Crash

    journal.after_write = crash
    crashed_calls = []
    with pytest.raises(Crash):
        _run(name, options, journal, crashed_calls)
    assert UnlearnJournal(root).rounds() == list(range(1, at + 1))
    res, calls = _run(name, options, UnlearnJournal(root))
    for k in full.adapter:
        assert torch.equal(res.adapter[k], full.adapter[k]), k
    assert res.rounds == full.rounds
    assert res.info.pop("resumed_after_round") == at
    same = {k: v for k, v in res.info.items() if k not in TIMINGS}
    assert same == {k: v for k, v in full.info.items() if k not in TIMINGS}
    # the resumed run asked only for the rounds after the crash: the crashed
    # run's queries and the resumed run's are the uninterrupted run's
    assert calls and crashed_calls + calls == full_calls


def test_resumed_log_after_the_stop_round_runs_nothing_more(tmp_path):
    name, options = "local_unlearn", {"rounds": 2}
    full, _ = _run(name, options)
    journal = UnlearnJournal(tmp_path / "log")
    journal.start({})
    _run(name, options, journal)  # finished: every round is logged
    res, calls = _run(name, options, UnlearnJournal(tmp_path / "log"))
    assert calls == []
    assert all(torch.equal(res.adapter[k], full.adapter[k]) for k in full.adapter)


def test_which_methods_resume_and_which_refuse_with_a_reason():
    resumable = {n for n in METHOD_REGISTRY if get_method(n).resume_refusal() is None}
    assert resumable == {"fed_eraser", "fedosd", "foul_server", "local_unlearn", "mpu"}
    for n in sorted(set(METHOD_REGISTRY) - resumable):
        assert n in get_method(n).resume_refusal()
    assert get_method("foul", {"mode": "server"}).resume_refusal() is None
    why = get_method("foul", {"mode": "live"}).resume_refusal()
    assert "live mode" in why and "round 1" in why


def test_a_log_entry_that_does_not_fit_the_adapter_is_a_clear_error(tmp_path):
    journal = UnlearnJournal(tmp_path / "log")
    journal.start({})
    journal.write(1, {"other.lora_A.weight": torch.zeros(2, 2)}, {})
    with pytest.raises(JournalError, match="round 1's adapter does not fit"):
        _run("local_unlearn", {"rounds": 3}, journal)


def test_journal_round_trip_start_clears_and_a_corrupt_entry_is_named(tmp_path):
    journal = UnlearnJournal(tmp_path / "log")
    journal.start({"config": {"seed": 3}})
    assert journal.latest() is None and journal.header() == {"config": {"seed": 3}}
    state = adapter_state(1)
    journal.write(1, adapter_state(0), {"a": 1})
    journal.write(2, state, {"curve": [{"round": 2, "x": 0.1 + 0.2}]})
    r, got, log_state = journal.latest()
    assert r == 2 and log_state == {"curve": [{"round": 2, "x": 0.1 + 0.2}]}
    assert all(torch.equal(got[k], state[k]) for k in state)
    (tmp_path / "log" / ".round_0003.safetensors.tmp").write_bytes(b"half")
    assert journal.rounds() == [1, 2]  # a half-written entry is not an entry
    path = tmp_path / "log" / "round_0002.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(JournalError, match="round_0002.safetensors is unreadable"):
        journal.latest()
    journal.start({})
    assert journal.rounds() == []


def test_a_failed_log_write_is_a_clear_error_and_keeps_the_earlier_rounds(
    tmp_path, monkeypatch
):
    journal = UnlearnJournal(tmp_path / "log")
    journal.start({})
    journal.write(1, adapter_state(0), {"n": 1})

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(JournalError, match="writing round 2 failed.*No space"):
        journal.write(2, adapter_state(1), {"n": 2})
    monkeypatch.undo()
    assert journal.rounds() == [1]
    assert journal.latest()[2] == {"n": 1}
    assert not list((tmp_path / "log").glob(".*.tmp"))


def test_the_kill_key_stays_out_of_the_fl_cache_key():
    base = RunConfig.from_flat({"preset": "tiny"}).fl_key(())
    kill = RunConfig.from_flat({"preset": "tiny", KILL_ROUND_KEY: 2}).fl_key(())
    assert kill == base


def test_cli_resume_refuses_a_finished_run_a_missing_log_and_a_refusing_method(
    tmp_path, capsys
):
    from simulations.cli import main

    assert main(["resume", str(tmp_path)]) == 1
    assert "no unlearning log" in capsys.readouterr().err
    journal = UnlearnJournal(tmp_path / "unlearn-log")
    journal.start({"config": {}, "steps": [], "resume_refusal": "foul says no"})
    assert main(["resume", str(tmp_path)]) == 2
    assert "foul says no" in capsys.readouterr().err
    (tmp_path / "run.json").write_text(json.dumps({}))
    assert main(["resume", str(tmp_path)]) == 2
    assert "has finished" in capsys.readouterr().err


@pytest.mark.slow
def test_server_killed_mid_unlearning_resumes_to_the_uninterrupted_result(tmp_path):
    """`fed-unlearn run` (2 clients, seeded MPU, 2 rounds) is killed with SIGKILL by its own
    fault key once round 1 is logged; `fed-unlearn resume` finishes it, and its
    unlearned adapter is bit-identical to an uninterrupted run's."""
    import signal
    import subprocess
    import sys

    from helpers import ROOT, run_cli, saved_adapters

    runs = tmp_path / "runs"
    args = ["run", "--preset", "tiny", "--clients", "2", "--rounds", "1"]
    args += ["--depart", "1", "--method", "mpu", "--opt", "seed=7"]
    args += ["--opt", "rounds=2", "--no-eval", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", *args, "--out", str(killed)]
        + ["--set", f"{KILL_ROUND_KEY}=1"],
        cwd=ROOT,
        env={**os.environ, "FED_UNLEARN_RUNS": str(runs)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        try:  # the Ray processes the killed server started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert not (killed / "run.json").exists()
    assert UnlearnJournal(killed / "unlearn-log").rounds() == [1]
    resumed = run_cli(["resume", str(killed), "--quiet"], runs)
    assert "resuming" in resumed.stdout and "after unlearning round 1" in resumed.stdout
    whole = tmp_path / "whole"
    run_cli([*args, "--out", str(whole)], runs)
    a, b = saved_adapters(killed), saved_adapters(whole)
    for k in b["unlearned"]:
        assert torch.equal(a["unlearned"][k], b["unlearned"][k]), k
    assert not all(
        torch.equal(b["unlearned"][k], b["original"][k]) for k in b["original"]
    )
    ra = json.loads((killed / "run.json").read_text())
    rb = json.loads((whole / "run.json").read_text())
    assert ra["unlearn_info"]["resumed_after_round"] == 1
    assert "resumed_after_round" not in rb["unlearn_info"]
    assert ra["rounds"]["unlearn"] == rb["rounds"]["unlearn"] == 2
    assert KILL_ROUND_KEY not in ra["config"]
    assert ra["cached"] == {"train": True, "retrain": True}


def test_a_log_where_the_departed_client_had_left_is_refused(tmp_path):
    journal = UnlearnJournal(tmp_path / "log")
    journal.start({})
    ctx, _, _ = full_context(adapter_state())
    ctx.clients = LeavingClients(ctx.clients.targets, 1, 1)
    ctx.journal = journal
    options = {"seed": 3, "rounds": 3, "recovery_rounds": 1}
    res = get_method("mpu", options).unlearn(ctx)
    assert res.info["departed_left"]["round"] == 2 and journal.rounds() == [1, 2]
    with pytest.raises(JournalError, match=r"\['1'\] stopped answering in round 2"):
        _run("mpu", options, UnlearnJournal(tmp_path / "log"))
