"""Sequential departures: ``--depart 2,0 --sequential`` is two requests, in order."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

from fed_unlearn.config import RunConfig
from fed_unlearn.history import HistoryStore

BASE = ["--preset", "tiny", "--clients", "4", "--rounds", "2", "--depart", "2,0"]


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sequential_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("out")
    for method in ("retrain", "none"):
        args = ["run", *BASE, "--sequential", "--method", method, "--quiet"]
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
    cfg = RunConfig.from_flat(
        {"preset": "tiny", "num-clients": 4, "num-server-rounds": 2}
    ).resolved()
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
    cfg = RunConfig.from_flat(
        {"preset": "tiny", "num-clients": 4, "num-server-rounds": 2}
    ).resolved()
    without_both = HistoryStore(runs / f"fl-{cfg.fl_key((0, 2))}" / "history").final()
    final = _adapter(out / "retrain" / "adapters" / "unlearned")
    assert _equal(final, {k: v.float() for k, v in without_both.items()})
    run = json.loads((out / "retrain" / "run.json").read_text())
    last = run["sequential"][-1]
    assert last["unlearned"] == last["oracle"]  # retrain is its own oracle
    assert run["summary"]["unlearned"] == run["summary"]["retrain"]
    # none: every request keeps the trained adapter
    none = out / "none"
    trained = _adapter(none / "adapters" / "original")
    for r in json.loads((none / "run.json").read_text())["sequential"]:
        step = none / r["dir"].split("/none/")[1]
        assert _equal(_adapter(step / "adapters" / "unlearned"), trained)
    assert _equal(_adapter(none / "adapters" / "unlearned"), trained)
