"""The relearning audit: split, gap, recovery ratio, both scenarios, the CLI."""

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
    """The main job with eval-relearn-steps and eval-relearn-benign-rounds:
    relearn.json holds both scenarios, run.json's ``relearn`` (the attack) and
    ``relearn_benign`` its three curves and figures, and the run's report
    shows the audit."""
    from helpers import E2E_BASE, run_cli

    runs = tmp_path_factory.mktemp("relearn_runs")
    out = tmp_path_factory.mktemp("relearn_out") / "run"
    args = ["run", *E2E_BASE, "--method", "foul_server", "--quiet", "--out", str(out)]
    args += ["--set", "eval-relearn-steps=4", "--set", "eval-max-items=6"]
    args += ["--set", "eval-relearn-benign-rounds=1"]
    run_cli(args, runs)
    run = json.loads((out / "run.json").read_text())
    rel = run["relearn"]
    audit = json.loads((out / "relearn.json").read_text())
    assert rel == audit["adversarial"]
    assert run["relearn_benign"] == audit["benign"]
    assert sorted(rel["curves"]) == ["original", "retrain", "unlearned"]
    for curve in rel["curves"].values():
        assert [p["step"] for p in curve] == [0, 1, 2, 3, 4]
    for curve in audit["benign"]["curves"].values():
        assert [p["round"] for p in curve] == [0, 1]
    assert audit["benign"]["spec"]["clients"] == [0, 1]
    assert rel["spec"]["lr"] == pytest.approx(run["config"]["lr"] / 5)
    assert rel["spec"]["attack_items"] + rel["spec"]["probe_items"] == 30
    assert rel["relearn_gap"] == pytest.approx(relearn_gap(rel["curves"]))
    assert run["wall_time_s"]["relearn"] > 0
    assert (out / "report" / "relearning_attack.png").is_file()
    assert "## Relearning audit" in (out / "report" / "report.md").read_text()


# ---------------------------------------------------------------- the audit


def _curve(x, *values):
    return [{x: i, "forget_Q_A_Prob": v} for i, v in enumerate(values)]


def test_recovery_ratio_by_hand():
    from fed_unlearn.metrics.relearn import recovery_ratio, scenario_figures

    curves = {
        "original": _curve("round", 0.8, 0.5),
        "retrain": _curve("round", 0.2, 0.25, 0.3),
        "unlearned": _curve("round", 0.3, 0.4, 0.55),
    }
    # (0.55 - 0.3) / (0.8 - 0.3): the share of what unlearning removed
    assert recovery_ratio(curves) == pytest.approx(0.5)
    # the oracle's floor: (0.3 - 0.2) / (0.8 - 0.2)
    assert recovery_ratio(curves, "retrain") == pytest.approx(1 / 6)
    # nothing removed (the method none): nothing to recover
    assert recovery_ratio({**curves, "unlearned": curves["original"]}) is None
    # a model that fell further under the attack recovers a negative share
    fell = {**curves, "unlearned": _curve("round", 0.3, 0.2)}
    assert recovery_ratio(fell) == pytest.approx(-0.2)
    figures = scenario_figures(curves)
    assert figures["final"] == {"original": 0.5, "retrain": 0.3, "unlearned": 0.55}
    assert figures["recovery_ratio"] == pytest.approx(0.5)
    assert figures["recovery_ratio_retrain"] == pytest.approx(1 / 6)
    # (0.55 - 0.3) / (0.8 - 0.2)
    assert figures["relearn_gap"] == pytest.approx(0.25 / 0.6)
    with pytest.raises(ValueError, match="no 'retrain' curve"):
        recovery_ratio({"original": curves["original"]}, "retrain")


@pytest.fixture
def audit_cfg(tiny_model_dir):
    """A 3-client tiny federation on the random test model; client 2 departs."""
    from fed_unlearn.config import RunConfig

    return RunConfig.from_flat(
        {
            "preset": "tiny",
            "model-path": str(tiny_model_dir),
            "num-clients": 3,
            "depart": "2",
            "people-per-client": 1,
            "qa-per-person": 10,
            "holdout-people": 1,
            "general-probes": 4,
            "num-server-rounds": 2,
            "local-epochs": 1,
            "lora-r": 4,
            "eval-max-items": 6,
            "seed": 3,
        }
    ).resolved()


def _loaded(cfg):
    from fed_unlearn.models import load_lora_model, prompt_formatter

    model, tok = load_lora_model(cfg.model_path, cfg.lora_spec(), cache=False)
    return model, tok, prompt_formatter(tok)


def _three_adapters(model):
    """Three different adapters: peft's init with seeded noise on B."""
    from fed_unlearn.models import init_adapter

    out = {}
    for i, name in enumerate(("original", "retrain", "unlearned")):
        state = init_adapter(model, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        out[name] = {
            k: v + 0.3 * torch.randn(v.shape, generator=g) if "lora_B" in k else v
            for k, v in state.items()
        }
    return out


def test_benign_scenario_with_no_rounds_changes_nothing(audit_cfg):
    from clients.task import dataset
    from fed_unlearn.metrics.quick import answer_prob
    from fed_unlearn.metrics.relearn import BenignSpec, benign_curve
    from fed_unlearn.models import get_adapter, set_adapter

    model, tok, pf = _loaded(audit_cfg)
    adapter = _three_adapters(model)["unlearned"]
    data = dataset(audit_cfg)
    forget = data.forget_items([2])
    spec = BenignSpec(0, 2, 3, 3, 1.0, audit_cfg.train_spec())
    curve, state = benign_curve(
        model, tok, pf, adapter, {0: data.clients[0]}, forget, spec, 64
    )
    assert len(curve) == 1 and curve[0]["round"] == 0
    assert all(torch.equal(state[k], adapter[k]) for k in adapter)
    assert all(torch.equal(get_adapter(model)[k], adapter[k]) for k in adapter)
    set_adapter(model, adapter)
    assert curve[0]["forget_Q_A_Prob"] == pytest.approx(
        answer_prob(model, tok, pf, forget, 64), rel=1e-6
    )


def test_benign_round_is_the_federations_next_round(audit_cfg):
    """One round of two clients = each trains from the global adapter with its
    FL-round seed, then the example-weighted mean (equal sizes: the plain
    mean, computed here by hand); the same seeds give the same curve."""
    from clients.task import dataset
    from fed_unlearn.metrics.relearn import BenignSpec, benign_curve
    from fed_unlearn.models import get_adapter, set_adapter
    from fed_unlearn.training import derive_seed, local_train

    model, tok, pf = _loaded(audit_cfg)
    adapter = _three_adapters(model)["unlearned"]
    data = dataset(audit_cfg)
    clients = {c: data.clients[c] for c in (0, 1)}
    assert len(clients[0]) == len(clients[1])
    spec = BenignSpec(1, 2, audit_cfg.seed, 3, 1.0, audit_cfg.train_spec())
    forget = data.forget_items([2])
    curve, state = benign_curve(model, tok, pf, adapter, clients, forget, spec, 64)
    assert [p["round"] for p in curve] == [0, 1]
    assert curve[1]["clients"] == [0, 1]
    by_hand = []
    for c in (0, 1):
        set_adapter(model, adapter)
        seed = derive_seed(audit_cfg.seed, 3, c)  # FL round 2 + 1
        local_train(model, tok, pf, clients[c], audit_cfg.train_spec(), seed)
        by_hand.append(get_adapter(model))
    for k in adapter:
        assert torch.allclose(state[k], (by_hand[0][k] + by_hand[1][k]) / 2, atol=1e-6)
    assert not torch.equal(state[next(iter(adapter))], adapter[next(iter(adapter))])
    again, _ = benign_curve(model, tok, pf, adapter, clients, forget, spec, 64)
    assert again == curve


def test_adversarial_scenario_is_the_old_relearning_attack(audit_cfg):
    """Scenario (b) gives exactly what ``eval-relearn-steps`` computed before
    the audit (split, spec and seed as the runner's relearn_adapters built them)."""
    from clients.task import dataset
    from fed_unlearn import seeds
    from fed_unlearn.training import derive_seed
    from simulations.audit import adversarial_scenario

    model, tok, pf = _loaded(audit_cfg)
    adapters = _three_adapters(model)
    new = adversarial_scenario(audit_cfg, adapters, model, tok, pf, steps=3)
    # the old path, step by step
    attack, probes = split_attack(dataset(audit_cfg).forget_items([2]), 0.5)
    spec = RelearnSpec(
        steps=3,
        fraction=0.5,
        lr=audit_cfg.lr / 5,
        batch_size=int(audit_cfg.batch_size),
        max_length=int(audit_cfg.max_length),
        seed=derive_seed(audit_cfg.seed, seeds.RELEARN),
    )
    old = {
        name: relearn_curve(model, tok, pf, state, attack, probes, spec)
        for name, state in adapters.items()
    }
    assert new["curves"] == old
    assert new["relearn_gap"] == relearn_gap(old)
    assert new["final"] == {n: c[-1]["forget_Q_A_Prob"] for n, c in old.items()}
    assert new["spec"]["attack_items"] == len(attack)
    assert new["spec"]["probe_items"] == len(probes)
    # the three adapters differ, and so do their curves
    assert len({c[0]["forget_Q_A_Prob"] for c in old.values()}) == 3


def _run_dir(path, cfg, adapters):
    from safetensors.torch import save_file

    for name, state in adapters.items():
        d = path / "adapters" / name
        d.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(d / "adapter_model.safetensors"),
        )
    run = {"config": cfg.to_flat(), "remaining": [0, 1], "method": "x"}
    (path / "run.json").write_text(json.dumps(run))
    return path


def test_audit_relearn_cli_writes_both_scenarios(audit_cfg, tmp_path):
    from helpers import run_cli

    from fed_unlearn.metrics.relearn import recovery_ratio

    model, _, _ = _loaded(audit_cfg)
    run_dir = _run_dir(tmp_path / "run", audit_cfg, _three_adapters(model))
    args = ["audit", "relearn", str(run_dir), "--steps", "2", "--rounds", "2"]
    proc = run_cli(args, tmp_path / "runs")
    assert "relearning audit:" in proc.stdout
    audit = json.loads((run_dir / "relearn.json").read_text())
    benign, adv = audit["benign"], audit["adversarial"]
    assert (
        sorted(benign["curves"])
        == sorted(adv["curves"])
        == [
            "original",
            "retrain",
            "unlearned",
        ]
    )
    for curve in benign["curves"].values():
        assert [p["round"] for p in curve] == [0, 1, 2]
    for curve in adv["curves"].values():
        assert [p["step"] for p in curve] == [0, 1, 2]
    assert benign["spec"]["clients"] == [0, 1]
    assert benign["spec"]["first_fl_round"] == 3
    for sc in (benign, adv):
        c = sc["curves"]
        p = {
            n: (v[0]["forget_Q_A_Prob"], v[-1]["forget_Q_A_Prob"]) for n, v in c.items()
        }
        rr = (p["unlearned"][1] - p["unlearned"][0]) / (
            p["original"][0] - p["unlearned"][0]
        )
        assert sc["recovery_ratio"] == pytest.approx(rr)
        assert sc["recovery_ratio_retrain"] == pytest.approx(
            recovery_ratio(c, "retrain")
        )
    run = json.loads((run_dir / "run.json").read_text())
    assert run["relearn"] == adv and run["relearn_benign"] == benign
    # --out elsewhere leaves the run directory alone
    other = tmp_path / "elsewhere.json"
    run_cli(
        [*args[:3], "--steps", "1", "--rounds", "0", "--out", str(other)],
        tmp_path / "runs",
    )
    assert json.loads(other.read_text())["benign"] is None
    assert json.loads((run_dir / "run.json").read_text()) == run


def test_audit_relearn_rejects_a_bad_run_dir(tmp_path, capsys):
    from simulations.cli import main

    def audit(path):
        rc = main(["audit", "relearn", str(path)])
        return rc, capsys.readouterr().err

    rc, err = audit(tmp_path / "nope")
    assert rc == 2 and "no such run directory" in err
    (tmp_path / "empty").mkdir()
    rc, err = audit(tmp_path / "empty")
    assert rc == 2 and "no run.json" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text(json.dumps({"config": {"preset": "tiny"}}))
    rc, err = audit(bad)
    assert rc == 2 and "missing adapter" in err and "original" in err
    (bad / "run.json").write_text(json.dumps({"config": {"num-clients": -1}}))
    rc, err = audit(bad)
    assert rc == 2 and "bad config" in err
    (bad / "run.json").write_text("{not json")
    rc, err = audit(bad)
    assert rc == 2 and "unreadable" in err
