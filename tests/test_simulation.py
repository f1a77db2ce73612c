"""The Flower Simulation Engine path, end to end on the tiny preset (3 clients)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from fed_unlearn.history import HistoryStore

ROOT = Path(__file__).resolve().parent.parent

#: every test here runs Flower federations in several processes
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("out") / "none"
    args = [
        "run",
        "--preset",
        "tiny",
        "--clients",
        "3",
        "--rounds",
        "2",
        "--depart",
        "2",
        "--method",
        "none",
        "--quiet",
        "--out",
        str(out),
    ]
    proc = run_cli(args, runs)
    return runs, out, json.loads((out / "run.json").read_text()), proc


def test_run_json_records_config_costs_and_versions(first_run):
    _, out, run, _ = first_run
    for key in (
        "config",
        "seeds",
        "versions",
        "git_sha",
        "wall_time_s",
        "bytes",
        "rounds",
        "summary",
    ):
        assert key in run
    assert set(run["wall_time_s"]) >= {"train", "unlearn", "retrain", "total"}
    assert set(run["bytes"]) >= {"train", "unlearn", "retrain"}
    assert run["config"]["num-server-rounds"] == 2 and run["departed"] == [2]
    assert run["versions"]["flwr"] == "1.42.0"  # the pinned version
    assert run["numerics"]["mode"] in ("native", "reproducible")
    # per-round evaluation hook: rounds 0..R for both FL phases, same start point
    assert [p["round"] for p in run["curves"]["train"]] == [0, 1, 2]
    assert [p["round"] for p in run["curves"]["retrain"]] == [0, 1, 2]
    assert run["curves"]["train"][0] == run["curves"]["retrain"][0]
    assert run["T2F"] is None  # `none` never reaches the oracle
    for name in ("original", "unlearned", "retrain"):
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
        assert (out / "adapters" / name / "adapter_config.json").is_file()
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    for key in (
        "forget_Q_A_Prob",
        "forget_Q_A_ROUGE",
        "retain_Q_A_Prob",
        "retain_Q_A_ROUGE",
    ):
        assert 0.0 <= summary[key] <= 1.0
    ev = json.loads((out / "TOFU_EVAL.json").read_text())
    assert len(ev["forget_Q_A_Prob"]["value_by_index"]) == 30  # 3 people x 10 items


def test_bytes_are_counted_on_the_flower_messages(first_run):
    _, _, run, _ = first_run
    store = HistoryStore(run["history"]["path"])
    adapter_bytes = sum(t.numel() * 4 for t in store.final().values())
    train, retrain = run["bytes"]["train"], run["bytes"]["retrain"]
    # 2 rounds x 3 clients, one fp32 adapter each way, plus small config/metrics records
    assert 6 * adapter_bytes <= train["down"] < 6 * adapter_bytes * 1.05
    assert 6 * adapter_bytes <= train["up"] < 6 * adapter_bytes * 1.05
    assert 4 * adapter_bytes <= retrain["down"] < 4 * adapter_bytes * 1.05
    assert run["bytes"]["unlearn"]["total"] == 0  # `none` sends nothing


def test_history_and_retrain_oracle(first_run):
    _, _, run, _ = first_run
    train = HistoryStore(run["history"]["path"])
    assert train.rounds() == [1, 2]
    assert train.clients() == {0, 1, 2}
    retrain_path = Path(run["history"]["path"]).parent.parent / (
        "fl-"
        + json.loads((Path(run["history"]["path"]).parent / "phase.json").read_text())[
            "key"
        ]
    )
    assert retrain_path.exists()
    pipeline = json.loads(
        (Path(run["config"]["out-dir"]) / "pipeline.json").read_text()
    )
    retrain = HistoryStore(Path(pipeline["retrain"]["path"]) / "history")
    assert retrain.clients() == {0, 1}
    r1, o1 = retrain.load(1), train.load(1)
    # same initialisation, and clients 0/1 compute exactly the same first-round update
    assert all(
        torch.equal(r1.global_state[k], o1.global_state[k]) for k in o1.global_state
    )
    for cid in (0, 1):
        assert all(
            torch.allclose(
                r1.client_deltas[cid][k], o1.client_deltas[cid][k], atol=1e-6
            )
            for k in o1.global_state
        )
    # FedAvg by num-examples, checked by hand on the recorded round 2
    last = train.load(2)
    n = last.num_examples
    total = sum(n.values())
    final = train.final()
    for k, g in last.global_state.items():
        expected = sum((g + last.client_deltas[c][k]) * n[c] for c in n) / total
        assert torch.allclose(final[k], expected, atol=1e-6)


def test_forget_gap_between_none_and_retrain(first_run):
    _, _, run, _ = first_run
    s = run["summary"]
    # even 2 rounds on tiny must leave more of the forget set in `none` than in retrain
    assert s["original"]["forget_Q_A_Prob"] > s["retrain"]["forget_Q_A_Prob"]


def test_second_method_reuses_the_cached_fl_phases(first_run, tmp_path):
    runs, _, run, _ = first_run
    out = tmp_path / "retrain"
    run_cli(
        [
            "run",
            "--preset",
            "tiny",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--depart",
            "2",
            "--method",
            "retrain",
            "--quiet",
            "--no-eval",
            "--out",
            str(out),
        ],
        runs,
    )
    run2 = json.loads((out / "run.json").read_text())
    assert run2["cached"] == {"train": True, "retrain": True}
    assert run2["bytes"]["unlearn"]["total"] == run["bytes"]["retrain"]["total"]
    from safetensors.torch import load_file

    a = load_file(out / "adapters" / "unlearned" / "adapter_model.safetensors")
    b = load_file(out / "adapters" / "retrain" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_cached_history_is_a_clear_error_and_writes_nothing(
    first_run, tmp_path
):
    runs, _, run, _ = first_run
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    hist = Path(str(run["history"]["path"]).replace(str(runs), str(copy)))
    victim = sorted(hist.glob("round_0001/client_*.safetensors"))[0]
    with open(victim, "r+b") as fh:
        fh.truncate(40)
    out = tmp_path / "bad"
    proc = run_cli(
        [
            "run",
            "--preset",
            "tiny",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--depart",
            "2",
            "--quiet",
            "--out",
            str(out),
        ],
        copy,
        check=False,
    )
    assert proc.returncode == 1
    assert "corrupt history" in proc.stderr and victim.name in proc.stderr
    assert "Traceback" not in proc.stderr  # one readable line, not a stack
    assert not out.exists()


def test_truncated_cached_phase_json_is_a_clear_error_naming_it(first_run, tmp_path):
    runs, _, run, _ = first_run
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    hist = Path(str(run["history"]["path"]).replace(str(runs), str(copy)))
    victim = hist.parent / "phase.json"
    victim.write_text(victim.read_text()[:20])
    out = tmp_path / "bad"
    args = ["run", "--preset", "tiny", "--clients", "3", "--rounds", "2"]
    proc = run_cli(
        [*args, "--depart", "2", "--quiet", "--out", str(out)], copy, check=False
    )
    assert proc.returncode == 1
    assert "phase.json is unreadable" in proc.stderr and str(victim) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_client_update_is_rejected_and_the_round_goes_on(tmp_path, monkeypatch):
    from clients.faulty import app as faulty_app
    from fed_unlearn.config import RunConfig
    from simulations.runner import simulate

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path))
    cfg = RunConfig.from_flat(
        {
            "preset": "tiny",
            "num-clients": 3,
            "num-server-rounds": 1,
            "local-epochs": 1,
            "seed": 3,
            "x-fault-client": 1,
            "x-fault-kind": "nan",
        }
    )
    out = simulate(cfg, ("train",), progress=False, client_app=faulty_app)
    rec = out.train.history.load(1)
    assert rec.participants == [0, 2]
    assert "NaN" in rec.rejected[1]
    logged = out.train.stats["round_log"][0]
    assert logged["participants"] == [0, 2]
    assert list(logged["rejected"]) == [1] and "NaN" in logged["rejected"][1]
    # the global adapter moved using the two good updates
    n = rec.num_examples
    final = out.train.final
    for k, g in rec.global_state.items():
        expected = sum((g + rec.client_deltas[c][k]) * n[c] for c in (0, 2)) / (
            n[0] + n[2]
        )
        assert torch.allclose(final[k], expected, atol=1e-6)


def test_evaluate_subcommand_reproduces_the_run_summary(first_run, tmp_path):
    import shutil

    _, out, run, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    proc = run_cli(["evaluate", str(copy)], first_run[0])
    assert proc.returncode == 0
    again = json.loads((copy / "run.json").read_text())["summary"]
    for model in ("original", "unlearned", "retrain"):
        for key in ("forget_Q_A_Prob", "retain_Q_A_Prob"):
            assert again[model][key] == pytest.approx(
                run["summary"][model][key], rel=1e-5
            )
