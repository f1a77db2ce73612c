"""The Deployment Engine path: flower-superlink + 2 flower-supernode + `flwr run .`."""

from __future__ import annotations

import json

import pytest
from helpers import assert_parity, run_cli

RUN = (
    "preset='tiny' num-clients=2 depart='1' num-server-rounds=1 local-epochs=1 seed=11"
)


def _deploy_and_simulate(tmp_path, monkeypatch, method, opts=()):
    """The same cell on the Deployment Engine and on the Simulation Engine, each
    with its own empty FL cache (nothing computed by one is reused by the other)."""
    from simulations.deployment import run_local_deployment

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "out"
    rc, log = run_local_deployment(
        2,
        f"{RUN} method='{method}' out-dir='{out}'"
        + (" method-options='" + ",".join(f"{k}={v}" for k, v in opts) + "'"),
        workdir=tmp_path / "work",
    )
    assert rc == 0, log[-3000:]
    sim = tmp_path / "sim"
    args = ["run", "--preset", "tiny", "--clients", "2", "--depart", "1"]
    args += ["--rounds", "1", "--local-epochs", "1", "--seed", "11"]
    args += ["--method", method, "--quiet", "--no-eval", "--out", str(sim)]
    for k, v in opts:
        args += ["--opt", f"{k}={v}"]
    run_cli(args, tmp_path / "sim-runs")
    return out, sim


@pytest.mark.slow
def test_local_deployment_engine_runs_the_pipeline(tmp_path, monkeypatch):
    out, sim = _deploy_and_simulate(tmp_path, monkeypatch, "foul_server")
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert pipeline["train"]["rounds"] == 1 and not pipeline["train"]["cached"]
    assert pipeline["train"]["round_log"][0]["participants"] == [0, 1]
    assert pipeline["retrain"]["round_log"][0]["participants"] == [0]
    assert (
        pipeline["train"]["bytes"]["down"] > 0 and pipeline["train"]["bytes"]["up"] > 0
    )
    fed = json.loads((out / "federated_eval.json").read_text())
    # every client evaluated every adapter on its own data
    assert set(fed) == {"original", "unlearned", "retrain"}
    for res in fed.values():
        assert {"client-0", "client-1"} <= set(res)
        assert res["forget_Q_A_Prob"] == res["client-1"]
    assert_parity(out, sim)  # the default method, foul_server


@pytest.mark.slow
def test_mpu_deployment_matches_the_simulation(tmp_path, monkeypatch):
    """MPU draws its secrets from ``secrets`` by default, so two runs of either
    engine differ by their noise; with its test seed both are bit-identical."""
    out, sim = _deploy_and_simulate(tmp_path, monkeypatch, "mpu", [("seed", 7)])
    assert_parity(out, sim)


@pytest.mark.slow
def test_a_supernode_killed_mid_round_is_left_out_and_named(tmp_path, monkeypatch):
    """SuperNode 2 of 3 is SIGKILLed (with its ClientApp) while it trains in FL
    round 1. Once its heartbeat lapses the SuperLink answers for it; the run goes
    on with the clients that answered and says who was missing: in every FL and
    retrain round, in foul_server's record (it had no update to weigh) and in
    the federated evaluation, whose means are over the clients that answered."""
    from simulations.deployment import run_local_deployment

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "out"
    rc, log = run_local_deployment(
        3,
        "preset='tiny' num-clients=3 depart='1' num-server-rounds=2 local-epochs=1 "
        f"seed=11 method='foul_server' out-dir='{out}'",
        workdir=tmp_path / "work",
        kill=(2, "Receiving: train message"),
    )
    assert rc == 0, log[-3000:]
    assert "ServerApp raised an exception" not in log, log[-3000:]
    pipeline = json.loads((out / "pipeline.json").read_text())
    for phase, alive in (("train", [0, 1]), ("retrain", [0])):
        rounds = pipeline[phase]["round_log"]
        assert [r["participants"] for r in rounds] == [alive, alive]
        for r in rounds:
            assert "Node Unavailable" in r["rejected"]["2"]
    assert pipeline["unlearn"]["info"]["remaining_without_history"] == [2]
    fed = json.loads((out / "federated_eval.json").read_text())
    for res in fed.values():
        assert set(res["missing"]) == {"client-2"}
        assert res["forget_Q_A_Prob"] == res["client-1"]
        assert res["retain_Q_A_Prob"] == res["client-0"]  # client 2 left out
