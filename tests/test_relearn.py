"""The relearning attack: split, gap, curve, config and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fed_unlearn.config import ConfigError, RunConfig
from fed_unlearn.metrics.relearn import (
    RelearnSpec,
    relearn_curve,
    relearn_gap,
    split_attack,
)
from fed_unlearn.types import QAItem


def _items(people):
    return [
        QAItem(question=f"{p} q{i}?", answer=f"a{i}", person=p)
        for p, n in people
        for i in range(n)
    ]


def test_split_attack_per_person_by_hand():
    items = _items([("A", 4), ("B", 1), ("C", 3)])
    attack, probes = split_attack(items, 0.5)
    # A: 2 + 2; B: one item, nothing to probe, left out; C: round(1.5) = 2 + 1
    assert [it.question for it in attack] == ["A q0?", "A q1?", "C q0?", "C q1?"]
    assert [it.question for it in probes] == ["A q2?", "A q3?", "C q2?"]
    # at least one attack item and one probe per person, whatever the fraction
    attack, probes = split_attack(_items([("A", 3)]), 0.01)
    assert len(attack) == 1 and len(probes) == 2
    attack, probes = split_attack(_items([("A", 3)]), 0.99)
    assert len(attack) == 2 and len(probes) == 1
    with pytest.raises(ValueError, match="no forgotten person has two items"):
        split_attack(_items([("A", 1), ("B", 1)]), 0.5)


def test_relearn_gap_by_hand():
    def c(*values):
        return [{"step": i, "forget_Q_A_Prob": v} for i, v in enumerate(values)]

    curves = {
        "original": c(0.8, 0.5),
        "retrain": c(0.2, 0.3),
        "unlearned": c(0.2, 0.45),
    }
    # (0.45 - 0.3) / (0.8 - 0.2): the denominator is taken before the attack
    assert relearn_gap(curves) == pytest.approx(0.25)
    assert relearn_gap({**curves, "original": c(0.2, 0.9)}) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"fraction": 1.0}, r"fraction must be in \(0, 1\)"),
        ({"every": -1}, "'every' must be >= 0"),
    ],
)
def test_relearn_spec_rejects_bad_values(kwargs, match):
    base = {"steps": 4, "fraction": 0.5, "lr": 1e-3, "batch_size": 2, "max_length": 32}
    with pytest.raises(ValueError, match=match):
        RelearnSpec(**{**base, **kwargs})


def test_relearn_config_keys_are_checked_and_leave_the_fl_cache_alone():
    base = RunConfig.from_flat({"preset": "tiny"})
    on = RunConfig.from_flat(
        {"preset": "tiny", "eval-relearn-steps": 8, "eval-relearn-lr": 1e-4}
    )
    assert on.fl_key(()) == base.fl_key(())
    for key, value in (
        ("eval-relearn-steps", -1),
        ("eval-relearn-fraction", 0.0),
        ("eval-relearn-lr", -1e-3),
    ):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flat({"preset": "tiny", key: value})


def test_relearn_curve_scores_the_probes_and_trains_on_the_attack(
    tiny_model_dir, items
):
    """Step 0 is the untouched adapter's probe score (checked against an
    independent answer_prob); the attack trains (the attack items' own
    probability rises) and the curve has a point every ``every`` steps."""
    from fed_unlearn.metrics.quick import answer_prob
    from fed_unlearn.models import (
        LoraSpec,
        get_adapter,
        init_adapter,
        load_lora_model,
        prompt_formatter,
        set_adapter,
    )

    model, tok = load_lora_model(tiny_model_dir, LoraSpec(r=4, alpha=8), cache=False)
    prompt_fn = prompt_formatter(tok)
    state = init_adapter(model, seed=0)
    attack, probes = split_attack(items, 0.5)
    spec = RelearnSpec(
        steps=6, fraction=0.5, lr=2e-2, batch_size=2, max_length=48, every=2
    )
    set_adapter(model, state)
    before_probes = answer_prob(model, tok, prompt_fn, probes, 48)
    before_attack = answer_prob(model, tok, prompt_fn, attack, 48)
    curve = relearn_curve(model, tok, prompt_fn, state, attack, probes, spec)
    assert [p["step"] for p in curve] == [0, 2, 4, 6]
    assert curve[0]["forget_Q_A_Prob"] == pytest.approx(before_probes, rel=1e-5)
    after = get_adapter(model)
    assert any(not torch.equal(after[k], state[k]) for k in state)
    assert answer_prob(model, tok, prompt_fn, attack, 48) > before_attack


@pytest.mark.slow
def test_relearning_attack_from_the_cli(tmp_path_factory):
    """The main job with eval-relearn-steps: run.json and RELEARN.json hold the
    three curves and the gap, and the run's report shows the attack."""
    from helpers import E2E_BASE, run_cli

    runs = tmp_path_factory.mktemp("relearn_runs")
    out = tmp_path_factory.mktemp("relearn_out") / "run"
    args = ["run", *E2E_BASE, "--method", "foul_server", "--quiet", "--out", str(out)]
    args += ["--set", "eval-relearn-steps=4", "--set", "eval-max-items=6"]
    run_cli(args, runs)
    run = json.loads((out / "run.json").read_text())
    rel = run["relearn"]
    assert rel == json.loads((out / "RELEARN.json").read_text())
    assert sorted(rel["curves"]) == ["original", "retrain", "unlearned"]
    for curve in rel["curves"].values():
        assert [p["step"] for p in curve] == [0, 1, 2, 3, 4]
    assert rel["spec"]["lr"] == pytest.approx(run["config"]["lr"] / 5)
    assert rel["spec"]["attack_items"] + rel["spec"]["probe_items"] == 30
    assert rel["relearn_gap"] == pytest.approx(relearn_gap(rel["curves"]))
    assert run["wall_time_s"]["relearn"] > 0
    assert (out / "report" / "relearning_attack.png").is_file()
