"""Sequential departures: ``--depart 2,0 --sequential`` is two requests, in order."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

from fed_unlearn.config import RunConfig
from fed_unlearn.history import HistoryStore

#: 3 clients, 1 FL round, small evaluation: the three runs share every FL phase.
BASE = [
    "--preset", "tiny", "--clients", "3", "--rounds", "1", "--depart", "2,0",
    "--set", "eval-max-items=6", "--set", "eval-curve-items=3",
]  # fmt: skip
CFG = {
    "preset": "tiny",
    "num-clients": 3,
    "num-server-rounds": 1,
    "eval-curve-items": 3,
}


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sequential_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("out")
    for method, opts in (
        ("retrain", []),
        ("none", []),
        ("ortho_lora", ["--opt", "rounds=2", "--opt", "eps=1.0"]),
    ):
        args = ["run", *BASE, "--sequential", "--method", method, *opts, "--quiet"]
        run_cli([*args, "--out", str(out / method)], runs)
    return runs, out


@pytest.mark.slow
def test_each_request_has_the_oracle_without_every_client_departed_so_far(
    sequential_runs,
):
    runs, out = sequential_runs
    run = json.loads((out / "retrain" / "run.json").read_text())
    reqs = run["sequential"]
    assert [r["client"] for r in reqs] == [2, 0]  # the order given, not sorted
    assert [r["forgotten"] for r in reqs] == [[2], [2, 0]]
    cfg = RunConfig.from_flat(CFG).resolved()
    for r, excluded in zip(reqs, ((2,), (0, 2)), strict=True):
        pipe = json.loads(
            (
                out / "retrain" / r["dir"].split("/retrain/")[1] / "pipeline.json"
            ).read_text()
        )
        assert pipe["retrain"]["path"] == str(runs / f"fl-{cfg.fl_key(excluded)}")
        # each step measures its oracle on the forget set of all departed so far
        assert set(r["oracle"]) >= {"model_utility", "request_forget_Q_A_Prob"}
    # the ledger of the run's own federation records the requests in order
    store = HistoryStore(out / "retrain" / "federation" / "history")
    assert [e["clients"] for e in store.unlearnings()] == [[2], [0]]


@pytest.mark.slow
def test_sequential_retrain_ends_at_the_retrain_without_all_and_none_moves_nothing(
    sequential_runs,
):
    runs, out = sequential_runs
    cfg = RunConfig.from_flat(CFG).resolved()
    without_both = HistoryStore(runs / f"fl-{cfg.fl_key((0, 2))}" / "history").final()
    final = _adapter(out / "retrain" / "adapters" / "unlearned")
    assert _equal(final, {k: v.float() for k, v in without_both.items()})
    run = json.loads((out / "retrain" / "run.json").read_text())
    last = run["sequential"][-1]
    # retrain is its own oracle (forget_quality is only scored against it)
    same = [k for k in last["oracle"] if k != "forget_quality"]
    assert same and all(last["unlearned"][k] == last["oracle"][k] for k in same)
    summ = run["summary"]
    assert all(
        summ["unlearned"][k] == summ["retrain"][k]
        for k in summ["retrain"]
        if k != "forget_quality"
    )
    assert summ["unlearned"]["forget_quality"] == 1.0  # identical distributions
    # none: every request keeps the trained adapter
    none = out / "none"
    trained = _adapter(none / "adapters" / "original")
    for r in json.loads((none / "run.json").read_text())["sequential"]:
        step = none / r["dir"].split("/none/")[1]
        assert _equal(_adapter(step / "adapters" / "unlearned"), trained)
    assert _equal(_adapter(none / "adapters" / "unlearned"), trained)


@pytest.mark.slow
def test_ortho_lora_requests_through_flower_have_orthogonal_updates(sequential_runs):
    """The real federation: request 2's update ΔW_2 = B_2 A - B_1 A is
    orthogonal to request 1's (ΔW_1ᵀ ΔW_2 = 0 per layer), lora_A never moves,
    and the bases reached the client (its logged residual is ~0)."""
    _, out = sequential_runs
    root = out / "ortho_lora"
    run = json.loads((root / "run.json").read_text())
    steps = [root / r["dir"].split("/ortho_lora/")[1] for r in run["sequential"]]
    a0 = _adapter(root / "adapters" / "original")
    a1 = _adapter(steps[0] / "adapters" / "unlearned")
    a2 = _adapter(steps[1] / "adapters" / "unlearned")
    checked = 0
    for key in a0:
        if "lora_A" not in key:
            assert "lora_B" in key
            continue
        assert torch.equal(a0[key], a1[key]) and torch.equal(a1[key], a2[key])
        b = key.replace("lora_A", "lora_B")
        a = a0[key].double()
        dw1 = (a1[b].double() - a0[b].double()) @ a
        dw2 = (a2[b].double() - a1[b].double()) @ a
        assert float(dw1.norm()) > 0 and float(dw2.norm()) > 0
        assert float((dw1.T @ dw2).abs().max()) <= 1e-5 * float(dw1.norm() * dw2.norm())
        checked += 1
    assert checked >= 2
    second = run["sequential"][1]["info"]["requests"][0]
    assert second["client"] == 0 and second["client_residual"] <= 1e-4
    assert second["overlap"] <= 1e-5
