"""Tests of fed_unlearn.report on synthetic run directories (no model, no flwr)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fed_unlearn.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONFIG = {
    "preset": "tiny",
    "model-path": "",
    "num-clients": 4,
    "num-server-rounds": 5,
    "seed": 7,
    "lr": 0.001,
    "depart": "1",
    "method": "x",
    "out-dir": "runs/x",
    "eval-max-items": 30,
}

ORIGINAL = {
    "forget_Q_A_Prob": 0.9,
    "forget_Q_A_ROUGE": 0.8,
    "retain_Q_A_Prob": 0.88,
    "retain_Q_A_ROUGE": 0.77,
    "forget_quality": 0.0012,
    "model_utility": 0.61,
}
RETRAIN = {
    "forget_Q_A_Prob": 0.2,
    "forget_Q_A_ROUGE": 0.3,
    "retain_Q_A_Prob": 0.86,
    "retain_Q_A_ROUGE": 0.75,
    "forget_quality": None,
    "model_utility": 0.6,
}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_run(
    root: Path,
    name: str,
    method: str,
    unlearned: dict,
    *,
    wall_unlearn: float,
    bytes_unlearn: int,
    curve: list[float] | None = None,
    t2f: int | None = None,
    evals: bool = True,
    generations: list[dict] | None = None,
    config: dict | None = None,
) -> Path:
    d = root / name
    run = {
        "method": method,
        "departed": [1],
        "config": {**CONFIG, "method": method, "out-dir": str(d), **(config or {})},
        "git_sha": "abc1234",
        "wall_time_s": {
            "train": 50.0,
            "unlearn": wall_unlearn,
            "retrain": 30.0,
            "eval": 5.0,
            "total": 100.0,
        },
        "bytes": {
            "train": {"down": 500, "up": 500, "total": 1000},
            "unlearn": {"down": bytes_unlearn, "up": 0, "total": bytes_unlearn},
            "retrain": {"down": 400, "up": 400, "total": 800},
        },
        "rounds": {"train": 5, "retrain": 5, "unlearn": len(curve or []) or 3},
        "summary": {"original": ORIGINAL, "unlearned": unlearned, "retrain": RETRAIN},
        "T2F": t2f,
    }
    if curve is not None:
        run["curves"] = {
            "train": [{"round": 5, "forget_Q_A_Prob": 0.92, "retain_Q_A_Prob": 0.9}],
            "unlearn": [
                {"round": i + 1, "forget_Q_A_Prob": v, "retain_Q_A_Prob": 0.8}
                for i, v in enumerate(curve)
            ],
            "retrain": [
                {"round": i + 1, "forget_Q_A_Prob": v, "retain_Q_A_Prob": 0.85}
                for i, v in enumerate([0.5, 0.3, 0.22])
            ],
        }
    _write(d / "run.json", run)
    if evals:
        _write(
            d / "evals" / "original" / "TOFU_SUMMARY.json",
            {**ORIGINAL, "privleak": -80.5},
        )
        retrain = {k: v for k, v in RETRAIN.items() if v is not None}
        _write(
            d / "evals" / "retrain" / "TOFU_SUMMARY.json",
            {**retrain, "privleak": 0.0},
        )
        _write(
            d / "evals" / "unlearned" / "TOFU_SUMMARY.json",
            {**unlearned, "privleak": -12.25},
        )
        _write(
            d / "evals" / "unlearned" / "TOFU_EVAL.json",
            {
                "forget_Q_A_Prob": {"agg_value": unlearned["forget_Q_A_Prob"]},
                "generations": {"forget": generations or [], "retain": []},
            },
        )
    return d


GENS = [
    {
        "question": "Where was Ann born?",
        "ground_truth": "In Oslo.",
        "generation": "<script>alert('x')</script> & more",
    },
    {"question": "Q2?", "ground_truth": "A2", "generation": "G2"},
    {"question": "Q3?", "ground_truth": "A3", "generation": "G3"},
    {"question": "Q4 (not shown)?", "ground_truth": "A4", "generation": "G4"},
]


@pytest.fixture
def runs(tmp_path):
    ga = make_run(
        tmp_path,
        "ga",
        "gradient_ascent",
        {
            **ORIGINAL,
            "forget_Q_A_Prob": 0.25,
            "forget_quality": 0.43,
            "model_utility": 0.55,
        },
        wall_unlearn=3.0,
        bytes_unlearn=200,
        curve=[0.7, 0.4, 0.26],
        t2f=3,
        generations=GENS,
    )
    fr = make_run(
        tmp_path,
        "fr",
        "federaser",
        {
            **ORIGINAL,
            "forget_Q_A_Prob": 0.31,
            "forget_quality": 0.05,
            "model_utility": 0.58,
        },
        wall_unlearn=12.0,
        bytes_unlearn=1200,
        evals=False,
    )
    return [ga, fr]


def _table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{md}")


def test_write_report_files_and_table(runs, tmp_path):
    out = tmp_path / "report"
    md_path = write_report(runs, out)
    assert md_path == out / "report.md"
    for name in ("report.md", "report.html"):
        assert (out / name).is_file()
    for png in ("forgetting_curve.png", "utility_vs_forgetting.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000

    md = md_path.read_text()
    for item in ("model**: tiny", "clients**: 4", "departed**: [1]", "seed**: 7"):
        assert item in md
    assert "git sha**: abc1234" in md and "rounds**: train 5, retrain 5" in md

    # gradient_ascent: values from TOFU_SUMMARY.json (privleak only there)
    ga = _table_row(md, "gradient_ascent")
    assert ga[1:] == [
        f"{0.43:.4g}",
        f"{0.55:.4g}",
        f"{0.25:.4g}",
        f"{0.8:.4g}",
        f"{-12.25:.4g}",
        "3",
        f"{3.0 / 30.0:.3g}",
        f"{200 / 800:.3g}",
        "–",  # no relearning attack in this run
    ]
    assert ga[7] == "0.1" and ga[8] == "0.25"
    # federaser: no evals/ -> run.json summary, no privleak / T2F
    fr = _table_row(md, "federaser")
    assert fr[1:] == [
        f"{0.05:.4g}",
        f"{0.58:.4g}",
        f"{0.31:.4g}",
        f"{0.8:.4g}",
        "–",
        "–",
        f"{12.0 / 30.0:.3g}",
        f"{1200 / 800:.3g}",
        "–",
    ]
    # reference rows first; retrain has no forget_quality
    orig = _table_row(md, "*original*")
    assert orig[1:6] == ["0.0012", "0.61", "0.9", "0.8", "-80.5"]
    retr = _table_row(md, "*retrain*")
    assert retr[1] == "–" and retr[3] == "0.2" and retr[5] == "0"
    assert md.index("*original*") < md.index("*retrain*") < md.index("gradient_ascent")

    # sample generations: up to 3 of the forget split
    assert "Sample generations" in md
    assert "Where was Ann born?" in md and "Q3?" in md
    assert "Q4 (not shown)?" not in md
    assert "<script>" not in md


def test_html_escapes_generations(runs, tmp_path):
    write_report(runs, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(imgs) == ["forgetting_curve.png", "utility_vs_forgetting.png"]
    assert "<table>" in page and "gradient_ascent" in page and "federaser" in page


def test_no_curves_still_plots(tmp_path):
    d = make_run(
        tmp_path,
        "only",
        "none",
        dict(ORIGINAL),
        wall_unlearn=0.0,
        bytes_unlearn=0,
    )
    md_path = write_report([d], tmp_path / "out")
    png = (tmp_path / "out" / "forgetting_curve.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    assert "No run recorded per-round curves" in md_path.read_text()
    # unlearn 0 s / retrain 30 s -> 0
    assert _table_row(md_path.read_text(), "none")[7] == "0"


def test_duplicate_methods_get_distinct_labels(tmp_path):
    a = make_run(tmp_path, "a", "ga", dict(ORIGINAL), wall_unlearn=1, bytes_unlearn=1)
    b = make_run(tmp_path, "b", "ga", dict(ORIGINAL), wall_unlearn=2, bytes_unlearn=2)
    md = write_report([a, b], tmp_path / "out").read_text()
    assert _table_row(md, "ga (a)")[7] == f"{1 / 30:.3g}"
    assert _table_row(md, "ga (b)")[7] == f"{2 / 30:.3g}"


def test_mismatched_config_names_key(tmp_path):
    a = make_run(tmp_path, "a", "ga", dict(ORIGINAL), wall_unlearn=1, bytes_unlearn=1)
    b = make_run(
        tmp_path,
        "b",
        "federaser",
        dict(ORIGINAL),
        wall_unlearn=1,
        bytes_unlearn=1,
        # method / out-dir / depart / eval-* may differ, lr may not
        config={"lr": 0.01, "depart": "2", "eval-max-items": 5},
    )
    with pytest.raises(ValueError, match="'lr'") as exc:
        write_report([a, b], tmp_path / "out")
    msg = str(exc.value)
    assert "depart" not in msg.replace(str(tmp_path), "")
    assert "eval-max-items" not in msg
    assert not (tmp_path / "out" / "report.md").exists()


def test_missing_run_json(tmp_path):
    a = make_run(tmp_path, "a", "ga", dict(ORIGINAL), wall_unlearn=1, bytes_unlearn=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="run.json") as exc:
        write_report([a, empty], tmp_path / "out")
    assert str(empty) in str(exc.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")


def test_no_run_dirs(tmp_path):
    with pytest.raises(ValueError, match="no run directories"):
        write_report([], tmp_path / "out")


def test_time_ratio_leaves_out_the_curve_evaluation_when_both_timed_it():
    from fed_unlearn.report import _method_walls

    wt = {
        "unlearn": 10.0,
        "retrain": 100.0,
        "excl_curve_eval": {"unlearn": 2.0, "retrain": 80.0},
    }
    assert _method_walls(wt) == (2.0, 80.0)
    # a retrain phase cached before the timing existed: compare the totals
    wt["excl_curve_eval"] = {"unlearn": 2.0}
    assert _method_walls(wt) == (10.0, 100.0)


def test_runs_of_one_method_are_labelled_by_their_differing_options(tmp_path):
    a = make_run(tmp_path, "a", "foul", dict(ORIGINAL), wall_unlearn=1, bytes_unlearn=1)
    b = make_run(
        tmp_path,
        "b",
        "foul",
        dict(ORIGINAL),
        wall_unlearn=2,
        bytes_unlearn=2,
        config={"method-mode": "server", "method-kappa": "0.5"},
    )
    c = make_run(
        tmp_path,
        "c",
        "foul",
        dict(ORIGINAL),
        wall_unlearn=3,
        bytes_unlearn=3,
        config={"method-kappa": "0.5"},
    )
    md = write_report([a, b, c], tmp_path / "out").read_text()
    assert _table_row(md, "foul (defaults)")[7] == f"{1 / 30:.3g}"
    assert _table_row(md, "foul (kappa=0.5, mode=server)")[7] == f"{2 / 30:.3g}"
    assert _table_row(md, "foul (kappa=0.5)")[7] == f"{3 / 30:.3g}"


def test_relearning_attack_column_and_figure(runs, tmp_path):
    """A run with the attack gets its relearn gap in the table, the reference
    rows get theirs from the same curves, and the figure appears; a report of
    runs without it has neither."""
    ga = json.loads((runs[0] / "run.json").read_text())

    def curve(values):
        return [{"step": 2 * i, "forget_Q_A_Prob": v} for i, v in enumerate(values)]

    ga["relearn"] = {
        "curves": {
            "original": curve([0.9, 0.95]),
            "retrain": curve([0.1, 0.2]),
            "unlearned": curve([0.15, 0.4]),
        },
        "relearn_gap": (0.4 - 0.2) / (0.9 - 0.1),
    }
    (runs[0] / "run.json").write_text(json.dumps(ga))
    out = tmp_path / "with"
    md = write_report(runs, out).read_text()
    assert _table_row(md, "gradient_ascent")[-1] == f"{0.25:.3g}"
    assert _table_row(md, "federaser")[-1] == "–"
    # original: (0.95 - 0.2) / (0.9 - 0.1); the oracle: 0 by definition
    assert _table_row(md, "*original*")[-1] == f"{0.75 / 0.8:.3g}"
    assert _table_row(md, "*retrain*")[-1] == "0"
    assert (out / "relearning_attack.png").read_bytes()[:8] == PNG_MAGIC
    assert "no attack recorded for: federaser" in md.lower()
    ga.pop("relearn")
    (runs[0] / "run.json").write_text(json.dumps(ga))
    write_report(runs, tmp_path / "without")
    assert not (tmp_path / "without" / "relearning_attack.png").exists()


def test_relearning_audit_section(runs, tmp_path):
    """Both scenarios of the audit: one table row each with the run's recovery
    ratios and gap, and a two-panel figure; only the adversarial one: one row."""
    ga = json.loads((runs[0] / "run.json").read_text())

    def curve(x, values):
        return [{x: i, "forget_Q_A_Prob": v} for i, v in enumerate(values)]

    def scenario(x, spec, rr, floor, gap):
        return {
            "spec": spec,
            "curves": {
                "original": curve(x, [0.9, 0.9]),
                "retrain": curve(x, [0.1, 0.2]),
                "unlearned": curve(x, [0.15, 0.4]),
            },
            "recovery_ratio": rr,
            "recovery_ratio_retrain": floor,
            "relearn_gap": gap,
        }

    ga["relearn"] = scenario("step", {"steps": 8}, 0.3333, 0.125, 0.25)
    ga["relearn_benign"] = scenario("round", {"rounds": 2}, 0.05, 0.0, None)
    (runs[0] / "run.json").write_text(json.dumps(ga))
    md = write_report(runs, tmp_path / "both").read_text()
    section = md.split("## Relearning audit", 1)[1].split("## Figures", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| gradient")]
    assert [r.split("|")[2:7] for r in rows] == [
        [" benign ", " 2 rounds ", " 0.05 ", " 0 ", " – "],
        [" adversarial ", " 8 steps ", " 0.333 ", " 0.125 ", " 0.25 "],
    ]
    assert "federaser" not in section  # no audit in that run
    html_text = (tmp_path / "both" / "report.html").read_text()
    assert "<h2>Relearning audit</h2>" in html_text
    assert (tmp_path / "both" / "relearning_attack.png").read_bytes()[:8] == PNG_MAGIC
    ga.pop("relearn_benign")
    (runs[0] / "run.json").write_text(json.dumps(ga))
    md = write_report(runs, tmp_path / "adv").read_text()
    section = md.split("## Relearning audit", 1)[1].split("## Figures", 1)[0]
    assert sum(line.startswith("| gradient") for line in section.splitlines()) == 1


def test_the_cli_table_shows_each_phase_cost_without_the_curve_evaluation(capsys):
    """The printed wall time of a phase is its cost (as in the bench), not the
    simulation's per-round curve evaluation, which a deployment does not run."""
    from simulations.cli import print_table

    summary = {"forget_Q_A_Prob": 0.4, "model_utility": 0.2}
    run = {
        "method": "foul_server",
        "departed": [2],
        "summary": {"original": summary, "unlearned": summary, "retrain": summary},
        "wall_time_s": {
            "train": 135.5,
            "unlearn": 61.1,
            "retrain": 82.3,
            "excl_curve_eval": {"train": 127.0, "unlearn": 14.7, "retrain": 74.7},
        },
        "bytes": {"train": {"total": 2e6}, "unlearn": {"total": 1e6}, "retrain": {}},
    }
    print_table(run)
    row = next(x for x in capsys.readouterr().out.splitlines() if "wall time (s)" in x)
    assert re.findall(r"\d+\.\d+", row) == ["127.000", "14.700", "74.700"]
