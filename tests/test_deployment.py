"""The Deployment Engine path: flower-superlink + 2 flower-supernode + `flwr run .`."""

from __future__ import annotations

import json


def test_local_deployment_engine_runs_the_pipeline(tmp_path, monkeypatch):
    from simulations.deployment import run_local_deployment

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "out"
    rc, log = run_local_deployment(
        2,
        f"preset='tiny' num-clients=2 depart='1' num-server-rounds=1 local-epochs=1 "
        f"seed=11 out-dir='{out}'",
        workdir=tmp_path / "work",
    )
    assert rc == 0, log[-3000:]
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
    for name in ("original", "unlearned", "retrain"):
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
