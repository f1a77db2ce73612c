"""A departed client that stops cooperating halfway through its unlearning.

The server keeps the adapter of the last complete round (the same adapter a
run with that many rounds gives), the stages that need only the remaining
clients go on, and the info (``run.json``'s ``unlearn_info``) says what was
done: ``stopped_by="departed_left"`` and ``departed_left`` with the round,
the rounds completed and why the client gave no reply.
"""

from __future__ import annotations

import pytest
import torch
from helpers import LeavingClients, adapter_state, full_context

from fed_unlearn.methods import get_method
from fed_unlearn.methods.base import ClientFailure


def _run(name, options, leave_after=None):
    ctx, _, _ = full_context(adapter_state())
    if leave_after is not None:
        ctx.clients = LeavingClients(ctx.clients.targets, 1, leave_after)
    return get_method(name, options).unlearn(ctx)


#: (method, its options, the option holding the unlearning round budget,
#: stages after unlearning that need only the remaining clients)
CASES = [
    ("mpu", {"seed": 3, "recovery_rounds": 1}, "rounds", 1),
    ("local_unlearn", {}, "rounds", 0),
    ("fedosd", {"post_rounds": 1}, "unlearn_rounds", 1),
    ("foul", {"mode": "live"}, "rounds", 0),
]


@pytest.mark.parametrize(("name", "options", "budget", "after"), CASES)
@pytest.mark.parametrize("completed", [0, 2])
def test_departed_client_leaving_keeps_the_last_complete_rounds_adapter(
    name, options, budget, after, completed
):
    res = _run(name, {**options, budget: 4}, leave_after=completed)
    info = res.info
    assert info["stopped_by"] == "departed_left"
    assert info["departed_left"] == {
        "round": completed + 1,
        "rounds_completed": completed,
        "clients": {"1": "failed the 'local-update' request: gone"},
    }
    assert res.rounds == completed + after
    # only the complete rounds are logged, then the remaining clients' stages
    assert [r["round"] for r in info["rounds"]] == list(range(1, completed + after + 1))
    if completed:
        # the adapter of a run that stops after that many rounds by budget
        same = _run(name, {**options, budget: completed})
        for k in same.adapter:
            assert torch.equal(res.adapter[k], same.adapter[k]), k
        assert same.info["stopped_by"] == "budget"
    elif not after:
        trained = adapter_state()
        assert all(torch.equal(res.adapter[k], trained[k]) for k in trained)


def test_a_remaining_client_failing_is_not_a_departure_and_still_fails():
    ctx, _, _ = full_context(adapter_state())
    ctx.clients = LeavingClients(ctx.clients.targets, 0, 0)  # client 0 remains
    with pytest.raises(ClientFailure, match="client 0 failed"):
        get_method("foul", {"mode": "live"}).unlearn(ctx)


@pytest.mark.slow
def test_departed_client_leaving_mid_mpu_in_a_simulated_federation(
    tmp_path, monkeypatch
):
    """The faulty ClientApp's departed client answers its first MPU round and
    fails the second: the run ends with round 1's adapter, the adapter a
    one-round MPU run gives, and the info says what was done."""
    from clients.faulty import app as faulty_app
    from fed_unlearn.config import RunConfig
    from simulations.runner import simulate

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path))
    flat = {
        "preset": "tiny",
        "num-clients": 3,
        "num-server-rounds": 1,
        "depart": "2",
        "method": "mpu",
        "method-seed": 5,
        "seed": 3,
        "x-fault-client": 2,
        "x-fault-kind": "leave",
        "x-fault-after": 1,
    }
    left = simulate(
        RunConfig.from_flat({**flat, "method-rounds": 3}),
        ("train", "unlearn"),
        progress=False,
        client_app=faulty_app,
    )
    info = left.unlearn_stats["info"]
    assert info["stopped_by"] == "departed_left"
    assert info["departed_left"]["round"] == 2
    assert info["departed_left"]["rounds_completed"] == 1
    assert list(info["departed_left"]["clients"]) == ["2"]
    assert "'local-update'" in info["departed_left"]["clients"]["2"]
    assert left.unlearn_stats["rounds"] == 1
    # a one-round run (the leaving client answers its one query) from the
    # cached FL phases gives the same adapter
    one = simulate(
        RunConfig.from_flat({**flat, "method-rounds": 1}),
        ("train", "unlearn"),
        progress=False,
        client_app=faulty_app,
    )
    assert one.train.cached and one.unlearn_stats["info"]["stopped_by"] == "budget"
    for k in one.unlearned:
        assert torch.equal(left.unlearned[k], one.unlearned[k]), k
    assert not all(
        torch.equal(left.unlearned[k], left.train.final[k]) for k in one.unlearned
    )
