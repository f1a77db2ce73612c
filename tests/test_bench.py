"""fed-unlearn bench: suite parsing, departures, aggregation (hand-computed)."""

import json

import pytest

from simulations import bench
from simulations.cli import main


def _suite(tmp_path, text, name="s"):
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


GOOD = """
description = "d"
seeds = [1, 2, 3]
[defaults]
preset = "tiny"
[[scenario]]
name = "a"
departs = 1
num-clients = 3
[[method]]
name = "foul_server"
[[method]]
name = "mpu"
label = "mpu-x"
options = { rounds = 2 }
"""


def test_shipped_suites_parse():
    names = bench.list_suites()
    assert {"ci", "calibration", "standard", "foul_paper", "smollm2"} <= set(names)
    for name in names:
        suite = bench.load_suite(name)
        assert bench.cells(suite)


def test_calibration_seeds_are_used_by_no_evaluation_suite():
    cal = set(bench.load_suite("calibration").seeds)
    assert bench.load_suite("calibration").purpose == "calibration"
    for name in bench.list_suites():
        suite = bench.load_suite(name)
        if suite.purpose == "evaluation":
            assert not cal & set(suite.seeds), name


def test_cells_carry_seed_departure_and_options(tmp_path):
    suite = bench.load_suite(str(_suite(tmp_path, GOOD)))
    cells = bench.cells(suite)
    assert len(cells) == 3 * 2
    c = next(c for c in cells if c.method.label == "mpu-x" and c.seed == 2)
    assert c.config.seed == 2 and c.config.method == "mpu"
    assert c.config.method_options == {"rounds": 2}
    assert c.config.departed() == bench.departing_clients(2, 3, 1)
    assert c.path(tmp_path) == tmp_path / "a" / "seed-2" / "mpu-x"


def test_departures_follow_the_seed():
    picks = {bench.departing_clients(s, 10, 2) for s in range(20)}
    assert len(picks) > 5  # the seed changes who departs
    for p in picks:
        assert len(p) == 2 and len(set(p)) == 2 and all(0 <= c < 10 for c in p)
    assert bench.departing_clients(7, 10, 2) == bench.departing_clients(7, 10, 2)
    with pytest.raises(bench.SuiteError, match="departs=3 needs"):
        bench.departing_clients(0, 3, 3)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (GOOD.replace("seeds = [1, 2, 3]", "seeds = []"), "seeds must be"),
        (
            GOOD.replace('description = "d"', 'colour = "red"'),
            r"unknown key\(s\) \['colour'\]",
        ),
        (GOOD.replace('name = "mpu"', 'name = "nope"'), "method mpu-x"),
        (
            GOOD.replace("num-clients = 3", "num-clients = 3\nseed = 4"),
            "'seed' is set by the bench",
        ),
        (GOOD.replace("departs = 1", "departs = 0"), "departs must be"),
        (GOOD.replace("{ rounds = 2 }", "{ no_such_option = 2 }"), "method mpu-x"),
    ],
)
def test_bad_suites_are_refused_naming_the_problem(tmp_path, text, match):
    with pytest.raises(bench.SuiteError, match=match):
        bench.load_suite(str(_suite(tmp_path, text)))


def test_unknown_suite_is_a_usage_error(capsys):
    assert main(["bench", "no_such_suite", "--out", "x"]) == 2
    assert "no suite 'no_such_suite'" in capsys.readouterr().err


def test_mean_ci_matches_hand_computation():
    # mean 2, sd 1, t(0.975, 2) = 4.302653 (tables): 4.302653 / sqrt(3) = 2.484138
    e = bench.mean_ci([1.0, 2.0, 3.0])
    assert e["mean"] == pytest.approx(2.0) and e["n"] == 3
    assert e["ci95"] == pytest.approx(2.484138, rel=1e-5)
    assert bench.mean_ci([5.0]) == {"mean": 5.0, "ci95": None, "n": 1}
    assert bench.mean_ci([None, float("nan")])["mean"] is None


def _fake_run(path, forget, utility, oracle_stopped=False):
    """A finished run directory with hand-chosen values."""
    (path / "evals" / "unlearned").mkdir(parents=True)
    run = {
        "summary": {
            "original": {"forget_Q_A_Prob": 0.3, "model_utility": 0.6},
            "unlearned": {
                "forget_Q_A_Prob": forget,
                "model_utility": utility,
                "forget_quality": 0.2,
            },
            "retrain": {"forget_Q_A_Prob": 0.05, "model_utility": 0.625},
        },
        "wall_time_s": {
            "unlearn": 5.0,
            "retrain": 20.0,
            "excl_curve_eval": {"unlearn": 1.0, "retrain": 10.0},
        },
        "bytes": {"unlearn": {"total": 20}, "retrain": {"total": 100}},
        "oracle_stopped": oracle_stopped,
        "curves": {"unlearn": [{"round": 0, "forget_Q_A_Prob": 0.3}], "retrain": []},
    }
    (path / "run.json").write_text(json.dumps(run))
    (path / "evals" / "unlearned" / "TOFU_SUMMARY.json").write_text(
        json.dumps({"privleak": -10.0})
    )


def test_cell_metrics_from_a_hand_made_run(tmp_path):
    _fake_run(tmp_path, forget=0.1, utility=0.5)
    m = bench.cell_metrics(tmp_path)
    assert m["gap_closed"] == pytest.approx((0.3 - 0.1) / (0.3 - 0.05))  # 0.8
    assert m["utility_ratio"] == pytest.approx(0.8)
    assert m["wall_ratio"] == pytest.approx(0.1)  # without the curve evaluation
    assert m["bytes_ratio"] == pytest.approx(0.2)
    assert m["privleak"] == -10.0 and m["relearn_gap"] is None
    assert m["relearn_adv_recovery"] is None and m["relearn_benign_recovery"] is None


def test_relearning_audit_metrics_and_their_columns(tmp_path):
    """The audit's recovery ratios come from run.json's two scenarios; their
    columns appear only in a scenario where some cell measured them."""
    _fake_run(tmp_path / "a", forget=0.1, utility=0.5)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    run["relearn"] = {
        "relearn_gap": 0.5,
        "recovery_ratio": 0.4,
        "recovery_ratio_retrain": 0.1,
    }
    run["relearn_benign"] = {
        "relearn_gap": None,
        "recovery_ratio": 0.25,
        "recovery_ratio_retrain": 0.0,
    }
    (tmp_path / "a" / "run.json").write_text(json.dumps(run))
    m = bench.cell_metrics(tmp_path / "a")
    assert (m["relearn_adv_recovery"], m["relearn_adv_floor"]) == (0.4, 0.1)
    assert (m["relearn_benign_recovery"], m["relearn_benign_floor"]) == (0.25, 0.0)

    def results(with_audit):
        entry = {k: bench.mean_ci([None]) for k, _, _ in bench.METRICS}
        if with_audit:
            entry["relearn_benign_recovery"] = bench.mean_ci([0.2, 0.3])
        entry.update(seeds=2, oracle_stopped=False)
        return {
            "suite": "s",
            "description": "d",
            "purpose": "evaluation",
            "seeds": [1, 2],
            "scenarios": {"x": {}},
            "aggregate": {"x": {"m": entry}},
        }

    md = bench.render_markdown(results(True), {})
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "benign recovery" in header and "adversarial recovery" not in header
    assert "| 0.25 ± " in md
    header = next(
        line
        for line in bench.render_markdown(results(False), {}).splitlines()
        if line.startswith("| method")
    )
    assert "recovery" not in header and "relearn gap" in header


def test_run_suite_skips_finished_cells_and_reruns_half_written_ones(tmp_path):
    suite = bench.load_suite(str(_suite(tmp_path, GOOD)))
    out = tmp_path / "out"
    ran = []
    forgets = {1: 0.05, 2: 0.1, 3: 0.3}

    def run_cell(cell, path):
        ran.append((cell.seed, cell.method.label))
        _fake_run(
            path, forgets[cell.seed], 0.5, oracle_stopped=cell.method.label == "mpu-x"
        )

    res = bench.run_suite(suite, out, run_cell, progress=False)
    assert len(ran) == 6
    agg = res["aggregate"]["a"]["foul_server"]
    # gap closed per seed: 1.0, 0.8, 0.0 -> mean 0.6
    assert agg["gap_closed"]["mean"] == pytest.approx(0.6) and agg["seeds"] == 3
    assert res["aggregate"]["a"]["mpu-x"]["oracle_stopped"] is True
    md = (out / "report.md").read_text()
    assert "mpu-x — oracle-stopped (upper bound)" in md
    assert "| foul_server | 3 | 0.60 ± " in md
    assert (out / "a_bars.png").is_file() and (out / "results.json").is_file()
    # resumable: nothing reruns; a half-written cell (no run.json) does
    ran.clear()
    half = out / "a" / "seed-2" / "mpu-x"
    (half / "run.json").unlink()
    bench.run_suite(suite, out, run_cell, progress=False)
    assert ran == [(2, "mpu-x")]


def test_publish_of_a_few_cells_keeps_the_published_rest(tmp_path):
    """A bench of one seed updates that seed's cells in the published report;
    the other published cells are carried over, marked, and counted."""
    suite = bench.load_suite(str(_suite(tmp_path, GOOD)))
    dest = tmp_path / "docs"
    first = tmp_path / "first"
    bench.run_suite(suite, first, lambda c, p: _fake_run(p, 0.3, 0.5), progress=False)
    bench.publish(suite, first, dest)  # gap 0 everywhere
    again = tmp_path / "again"
    one = bench.select(suite, methods=["foul_server"], seeds=[2])
    bench.run_suite(one, again, lambda c, p: _fake_run(p, 0.05, 0.5), progress=False)
    target = bench.publish(suite, again, dest)
    res = json.loads((target / "results.json").read_text())
    assert len(res["cells"]) == 6
    fresh = [c for c in res["cells"] if not c["carried"]]
    assert [(c["seed"], c["method"]) for c in fresh] == [(2, "foul_server")]
    # foul_server: gap 0, 1, 0 over seeds 1-3 -> mean 1/3; mpu-x stays 0
    agg = res["aggregate"]["a"]
    assert agg["foul_server"]["gap_closed"]["mean"] == pytest.approx(1 / 3)
    assert agg["mpu-x"]["gap_closed"]["mean"] == pytest.approx(0.0)
    assert agg["foul_server"]["seeds"] == 3
    md = (target / "report.md").read_text()
    assert "1 measured in this bench, 5 carried over" in md
    assert (target / "a_bars.png").is_file()
    # a published file that is not JSON: a clear error, and nothing rewritten
    (target / "results.json").write_text("{oops")
    before = (target / "report.md").read_text()
    with pytest.raises(bench.SuiteError, match="not JSON"):
        bench.publish(suite, again, dest)
    assert (target / "report.md").read_text() == before


def test_a_method_without_a_finished_cell_is_named_not_tabled(tmp_path):
    suite = bench.load_suite(str(_suite(tmp_path, GOOD)))
    out = tmp_path / "out"
    only = bench.select(suite, methods=["foul_server"])
    bench.run_suite(only, out, lambda c, p: _fake_run(p, 0.1, 0.5), progress=False)
    res = bench.aggregate(suite, out)
    assert res["aggregate"]["a"]["mpu-x"]["seeds"] == 0
    md = bench.render_markdown(res, {})
    assert "No finished cell yet: mpu-x." in md
    assert "| mpu-x |" not in md and "| foul_server | 3 |" in md


def test_oracle_stopped_run_is_flagged_and_charged_the_oracle():
    from simulations.runner import add_oracle_cost

    def run():
        return {
            "wall_time_s": {
                "unlearn": 2.0,
                "retrain": 10.0,
                "excl_curve_eval": {"unlearn": 1.0, "retrain": 8.0},
            },
            "bytes": {
                "unlearn": {"down": 1, "up": 2, "total": 3},
                "retrain": {"down": 10, "up": 20, "total": 30},
            },
        }

    free = run()
    add_oracle_cost(free, False)
    assert free["oracle_stopped"] is False and free["wall_time_s"]["unlearn"] == 2.0
    r = run()
    add_oracle_cost(r, True)
    assert r["oracle_stopped"] is True
    assert r["wall_time_s"]["unlearn"] == 12.0
    assert r["wall_time_s"]["excl_curve_eval"]["unlearn"] == 9.0
    assert r["bytes"]["unlearn"] == {"down": 11, "up": 22, "total": 33}
    assert r["bytes"]["unlearn_method_only"]["total"] == 3


def test_select_restricts_methods_and_seeds(tmp_path, capsys):
    suite = bench.load_suite(str(_suite(tmp_path, GOOD)))
    sub = bench.select(suite, ["mpu-x"], [2, 3])
    assert [m.label for m in sub.methods] == ["mpu-x"] and sub.seeds == (2, 3)
    assert bench.select(suite) == suite
    with pytest.raises(bench.SuiteError, match=r"has no method \['nope'\]"):
        bench.select(suite, ["nope"])
    path = str(_suite(tmp_path, GOOD))
    assert main(["bench", path, "--out", str(tmp_path / "o"), "--seeds", "x"]) == 2
    assert main(["bench", path, "--out", str(tmp_path / "o"), "--seeds", "9"]) == 2
    assert "has no seed [9]" in capsys.readouterr().err


TWO_SCENARIOS = (
    GOOD
    + """
[[scenario]]
name = "b"
departs = 1
num-clients = 4
methods = ["mpu-x"]
"""
)


def test_a_scenario_may_run_only_some_methods(tmp_path):
    suite = bench.load_suite(str(_suite(tmp_path, TWO_SCENARIOS)))
    got = {(c.scenario.name, c.method.label) for c in bench.cells(suite)}
    # scenario a runs both rows, b only the one it names; 3 seeds each
    assert got == {("a", "foul_server"), ("a", "mpu-x"), ("b", "mpu-x")}
    assert len(bench.cells(suite)) == 3 * 3
    res = bench.aggregate(suite, tmp_path / "empty")
    assert set(res["aggregate"]["b"]) == {"mpu-x"}
    bad = TWO_SCENARIOS.replace('methods = ["mpu-x"]', 'methods = ["mpu-y"]')
    with pytest.raises(
        bench.SuiteError, match=r"scenario b names method labels \['mpu-y'\]"
    ):
        bench.load_suite(str(_suite(tmp_path, bad, "bad")))


def test_select_restricts_scenarios(tmp_path, capsys):
    suite = bench.load_suite(str(_suite(tmp_path, TWO_SCENARIOS)))
    sub = bench.select(suite, scenarios=["b"])
    assert [s.name for s in sub.scenarios] == ["b"]
    assert {c.scenario.name for c in bench.cells(sub)} == {"b"}
    path = str(_suite(tmp_path, TWO_SCENARIOS))
    assert main(["bench", path, "--out", str(tmp_path / "o"), "--scenarios", "z"]) == 2
    assert "has no scenario ['z']" in capsys.readouterr().err


def _sequential_record(j, client, utility, oracle):
    return {
        "request": j,
        "client": client,
        "unlearned": {
            "model_utility": utility,
            "forget_Q_A_Prob": 0.1,
            "request_forget_Q_A_Prob": 0.2,
        },
        "oracle": {
            "model_utility": oracle,
            "forget_Q_A_Prob": 0.05,
            "request_forget_Q_A_Prob": 0.04,
        },
    }


def test_sequential_cells_aggregate_per_request(tmp_path):
    """Two seeds of two requests, hand-chosen: request 1 utilities 0.5 and 0.7
    (oracle 0.6) -> mean 0.6, CI t(0.975, 1) * sd / sqrt(2) = 12.706205 * 0.1;
    request 2: 0.4 and 0.2 -> mean 0.3; utility ratios 0.5/0.6, 0.7/0.6 -> 1."""
    per_seed = []
    for seed, (u1, u2) in ((1, (0.5, 0.4)), (2, (0.7, 0.2))):
        path = tmp_path / f"s{seed}"
        _fake_run(path, forget=0.1, utility=u2)
        run = json.loads((path / "run.json").read_text())
        run["sequential"] = [
            _sequential_record(1, 3, u1, 0.6),
            _sequential_record(2, 7, u2, 0.5),
        ]
        (path / "run.json").write_text(json.dumps(run))
        per_seed.append(bench.cell_metrics(path)["sequential"])
    assert [r["client"] for r in per_seed[0]] == [3, 7]
    agg = bench.aggregate_requests(per_seed)
    assert [a["request"] for a in agg] == [1, 2]
    assert agg[0]["model_utility"]["mean"] == pytest.approx(0.6)
    assert agg[0]["model_utility"]["ci95"] == pytest.approx(1.2706205, rel=1e-5)
    assert agg[1]["model_utility"]["mean"] == pytest.approx(0.3)
    assert agg[0]["utility_ratio"]["mean"] == pytest.approx(1.0)
    assert agg[1]["oracle_model_utility"]["mean"] == pytest.approx(0.5)
    assert agg[0]["request_forget_Q_A_Prob"]["mean"] == pytest.approx(0.2)
    md = "\n".join(bench._sequential_md({"ortho": {"sequential": agg}}))
    assert "| ortho | 0.600 ± 1.271 | 0.300 ± 1.271 |" in md
    assert "| retrain oracle (per step) | 0.600 ± 0.000 | 0.500 ± 0.000 |" in md
    png = bench._plot_requests("sc", {"ortho": agg}, tmp_path)
    assert (tmp_path / png).is_file()
    # a one-request cell has no per-request figures
    assert bench.cell_metrics(tmp_path / "s1")["sequential"] and not (
        bench.sequential_metrics({"summary": {}})
    )
