from __future__ import annotations

import pytest

from fed_unlearn.config import ConfigError, RunConfig


def test_from_flat_reads_hyphenated_keys_and_coerces_types():
    cfg = RunConfig.from_flat(
        {"num-clients": "4", "lr": "0.01", "depart": "1,3", "preset": "tiny"}
    )
    assert cfg.num_clients == 4 and isinstance(cfg.num_clients, int)
    assert cfg.lr == pytest.approx(0.01)
    assert cfg.departed() == (1, 3)
    assert cfg.remaining() == (0, 2)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['num-client'\]"):
        RunConfig.from_flat({"num-client": 3})


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
        ({"num-clients": 1}, "num-clients"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"aggregation": "median"}, "aggregation"),
        ({"num-clients": "three"}, "num-clients"),
        ({"num-clients": 2.5}, "num-clients"),
        ({"history-dtype": "int8"}, "history-dtype"),
        ({"depart": "7"}, r"client\(s\) \[7\] never joined"),
        # the default departure (client 2) outside a smaller federation: the
        # error names the key the user gave
        (
            {"num-clients": 2},
            r"\[2\] never joined; with num-clients = 2 the clients are 0\.\.1",
        ),
        ({"depart": "x"}, "'x' is not a client id"),
        ({"depart": "0,1,2"}, "at least one client must remain"),
        ({"depart": ""}, "at least one client id"),
    ],
)
def test_bad_values_are_rejected_with_the_key(flat, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat(flat)


def test_resolved_fills_preset_defaults_but_keeps_explicit_values():
    cfg = RunConfig.from_flat({"preset": "tiny", "lr": 0.5})
    r = cfg.resolved()
    assert r.lr == 0.5
    assert r.num_server_rounds == 4  # the tiny preset's rounds
    assert cfg.num_server_rounds is None  # the original is untouched
    custom = RunConfig.from_flat({"model-path": "/somewhere"}).resolved()
    assert custom.lr == 1e-3  # the custom preset's learning rate


def test_flat_round_trip():
    cfg = RunConfig.from_flat(
        {"preset": "tiny", "num-server-rounds": 2, "x-note": "hi"}
    )
    again = RunConfig.from_flat(cfg.to_flat())
    assert again == cfg


def test_fl_key_ignores_method_and_output_but_not_training_or_exclusions():
    a = RunConfig.from_flat({"preset": "tiny", "method": "none", "out-dir": "a"})
    b = RunConfig.from_flat({"preset": "tiny", "method": "retrain", "out-dir": "b"})
    c = RunConfig.from_flat({"preset": "tiny", "lr": 0.1})
    assert a.fl_key(()) == b.fl_key(())
    assert a.fl_key(()) != c.fl_key(())
    assert a.fl_key(()) != a.fl_key((2,))
    # an explicit value equal to the preset default is the same run
    d = RunConfig.from_flat({"preset": "tiny", "lr": 5e-3})  # the tiny default
    assert d.fl_key(()) == a.fl_key(())


def test_fl_key_ignores_evaluation_only_data_settings():
    """The evaluation's item cap and probe count change no FL phase: any value
    reuses the default run's phases; the people a client trains on do not
    change with them, while a training-data setting changes the key."""
    from clients.task import dataset

    a = RunConfig.from_flat({"preset": "tiny"})
    b = RunConfig.from_flat(
        {"preset": "tiny", "eval-max-items": 50, "general-probes": 40}
    )
    assert a.fl_key(()) == b.fl_key(()) and a.fl_key((2,)) == b.fl_key((2,))
    assert dataset(a).clients == dataset(b).clients
    assert len(dataset(b).general) == 40 != len(dataset(a).general)
    c = RunConfig.from_flat({"preset": "tiny", "qa-per-person": 12})
    assert c.fl_key(()) != a.fl_key(())


def test_fl_key_follows_the_base_model(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text("{}")
    ka = RunConfig.from_flat({"model-path": str(a)}).fl_key(())
    kb = RunConfig.from_flat({"model-path": str(b)}).fl_key(())
    assert ka != kb
    import os

    os.utime(a / "config.json", ns=(1, 1))  # the model files changed
    assert RunConfig.from_flat({"model-path": str(a)}).fl_key(()) != ka
    tiny = RunConfig.from_flat({"preset": "tiny"}).fl_key(())
    smol = RunConfig.from_flat({"preset": "smollm2"}).fl_key(())
    assert tiny != smol


def test_eval_gradnorm_is_an_evaluation_option_only():
    on = RunConfig.from_flat({"preset": "tiny", "eval-gradnorm": "true"})
    off = RunConfig.from_flat({"preset": "tiny"})
    assert on.eval_gradnorm is True and off.eval_gradnorm is False
    assert on.fl_key(()) == off.fl_key(())  # cached FL phases are reused
    with pytest.raises(ConfigError, match="eval-gradnorm"):
        RunConfig.from_flat({"eval-gradnorm": "sometimes"})


def test_runner_passes_eval_gradnorm(monkeypatch):
    """evaluate_adapters asks for mia_gradnorm exactly when eval-gradnorm is set."""
    import fed_unlearn.metrics as metrics
    import fed_unlearn.models as models
    from simulations import runner

    seen = []

    def fake_evaluate(*args, gradnorm=False, **kwargs):
        seen.append(gradnorm)
        return {}, {}

    monkeypatch.setattr(metrics, "evaluate", fake_evaluate)
    monkeypatch.setattr(models, "load_lora_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(models, "resolve_model_dir", lambda *a, **k: "x")
    monkeypatch.setattr(models, "prompt_formatter", lambda tok: str)
    monkeypatch.setattr(models, "set_adapter", lambda m, a: None)
    import torch

    adapters = {"retrain": {"a": torch.zeros(1)}, "unlearned": {"a": torch.ones(1)}}
    for flag in (False, True):
        cfg = RunConfig.from_flat({"preset": "tiny", "eval-gradnorm": flag})
        runner.evaluate_adapters(cfg.resolved(), adapters)
    assert seen == [False, False, True, True]


def test_method_options_string_for_deployments():
    from fed_unlearn.config import parse_method_options

    assert parse_method_options(" seed=7, kappa=0.5,stop=budget ,") == {
        "seed": 7,
        "kappa": 0.5,
        "stop": "budget",
    }
    cfg = RunConfig.from_flat(
        {"method": "mpu", "method-options": "seed=7", "method-rounds": 2}
    )
    assert cfg.method_options == {"seed": 7, "rounds": 2}
    with pytest.raises(ConfigError, match="'method-options': 'kappa' is not"):
        RunConfig.from_flat({"method-options": "kappa"})


def test_a_single_departing_client_given_as_a_number_is_accepted():
    """`--set depart=1` parses to the int 1 (and `depart = 1` in TOML is one):
    it is the client id "1", not a type error; a float or bool still is."""
    from fed_unlearn.config import parse_value

    c = RunConfig.from_flat({"depart": parse_value("1"), "num-clients": 3})
    assert c.depart == "1" and c.departed() == (1,)
    for bad in (1.5, True):
        with pytest.raises(ConfigError, match="config key 'depart': bad value"):
            RunConfig.from_flat({"depart": bad, "num-clients": 3})


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        ({"num-server-rounds": -1}, "'num-server-rounds' must be >= 0"),
        ({"lr": -1.0}, "'lr' must be >= 0"),
        ({"local-epochs": -2}, "'local-epochs' must be >= 0"),
        ({"batch-size": -1}, "'batch-size' must be >= 0"),
        ({"lora-r": -1}, "'lora-r' must be >= 0"),
        ({"lr": float("nan")}, "'lr' must be >= 0"),
        ({"lora-dropout": 1.0}, "'lora-dropout' must be in"),
        ({"depart": "1,1", "num-clients": 3}, r"client\(s\) \[1\] listed more than"),
    ],
)
def test_values_no_run_can_use_are_refused_before_training(flat, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_flat({"preset": "tiny", **flat})


def test_resolved_config_is_frozen_complete_and_flattens_as_before():
    """The resolved form holds every value, cannot be changed, keeps RunConfig's
    field order (run.json's `config` and the FL cache key read `to_flat`), and
    sends the clients the config as given (the wire is unchanged)."""
    import dataclasses

    from fed_unlearn.config import (
        PRESET,
        PRESET_DEFAULTS,
        PRESET_FIELDS,
        ResolvedConfig,
        resolve,
    )
    from fed_unlearn.protocol import encode_run

    given = RunConfig.from_flat({"preset": "tiny", "lr": 0.5, "x-note": "n"})
    r = given.resolved()
    assert isinstance(r, ResolvedConfig) and resolve(r) is r
    assert [f.name for f in dataclasses.fields(ResolvedConfig)] == [
        *(f.name for f in dataclasses.fields(RunConfig)),
        "from_preset",
    ]
    assert all(getattr(r, k) is not PRESET for k in PRESET_FIELDS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.lr = 0.1  # type: ignore[misc]
    # to_flat: every value the run uses, in RunConfig's order
    want = {**given.to_flat()}
    for k in PRESET_FIELDS:
        want.setdefault(k.replace("_", "-"), PRESET_DEFAULTS["tiny"][k])
    # the default method on tiny gets tiny's calibrated step (set by hand here)
    want["method-server_lr"] = 0.5
    want["method-recovery_rounds"] = 1
    assert r.to_flat() == want
    assert list(r.to_flat())[:3] == ["preset", "model-path", "data-dir"]
    assert RunConfig.from_flat(r.to_flat()).resolved() == r
    # the wire carries what was given, as before the resolved form existed
    assert r.given_flat() == given.to_flat()
    assert list(r.given_flat()) == list(given.to_flat())
    assert encode_run(r) == encode_run(given)
    assert r.from_preset == (frozenset(PRESET_FIELDS) - {"lr"}) | {
        "method-server_lr",
        "method-recovery_rounds",
    }
    # the preset's values of a model path, and the relearning attack's rate
    custom = RunConfig.from_flat({"model-path": "/somewhere"}).resolved()
    assert custom.lr == 1e-3 and custom.relearn_lr() == pytest.approx(2e-4)
    assert RunConfig.from_flat({"eval-relearn-lr": 0.3}).resolved().relearn_lr() == 0.3


def test_a_method_gets_its_base_models_calibrated_defaults_unless_it_sets_them():
    """foul_server: half the share and one recovery round on the tiny base, the
    module's own defaults (the whole share, no client contacted) on SmolLM2 and
    on a model path; a given option always wins, in either spelling; other
    methods get nothing; what was given stays what travels; what a method
    needs follows the resolved options."""
    from fed_unlearn.config import PRESET_METHOD_DEFAULTS
    from fed_unlearn.methods import Requirement, get_method
    from fed_unlearn.methods.foul.server import FoulServerConfig

    assert PRESET_METHOD_DEFAULTS["tiny"]["foul_server"] == {
        "server_lr": 0.5,
        "recovery_rounds": 1,
    }
    own = FoulServerConfig()
    assert (own.server_lr, own.recovery_rounds) == (1.0, 0)

    def method(flat, name="foul_server"):
        cfg = RunConfig.from_flat({"method": name, **flat}).resolved()
        return get_method(cfg.method, cfg.method_options)

    def lr(flat):
        return method(flat).config.server_lr

    assert lr({"preset": "tiny"}) == 0.5
    assert method({"preset": "tiny"}).config.recovery_rounds == 1
    assert lr({"preset": "smollm2"}) == 1.0
    assert method({"preset": "smollm2"}).config.recovery_rounds == 0
    assert lr({"preset": "tiny", "model-path": "/somewhere"}) == 1.0
    assert lr({"preset": "tiny", "method-server_lr": 0.8}) == 0.8
    assert lr({"preset": "tiny", "method-options": "server-lr=0.7"}) == 0.7
    # the tiny run's recovery round needs live clients; SmolLM2's step none
    assert Requirement.LIVE_CLIENTS in method({"preset": "tiny"}).needs()
    assert Requirement.LIVE_CLIENTS not in method({"preset": "smollm2"}).needs()
    mpu = RunConfig.from_flat({"preset": "tiny", "method": "mpu"}).resolved()
    assert mpu.method_options == {}

    # ortho_lora and simu: one round on tiny, the inner-loss default elsewhere
    def rounds(flat, name="ortho_lora"):
        return method(flat, name).config.rounds

    assert rounds({"preset": "tiny"}) == 1
    assert rounds({"preset": "smollm2"}) == 4
    assert rounds({"preset": "tiny", "method-rounds": 3}) == 3
    assert rounds({"preset": "tiny"}, "simu") == 1
    tiny = RunConfig.from_flat({"preset": "tiny", "method": "foul_server"})
    assert "method-server_lr" not in tiny.resolved().given_flat()
    assert tiny.resolved().to_flat()["method-server_lr"] == 0.5


def test_flwr_run_defaults_are_the_class_defaults_but_the_deliberate_ones():
    """`[tool.flwr.app.config]` declares every key with RunConfig's default (0 for
    the preset's), except the documented FLWR_RUN_DEFAULTS of the deployment
    demo and the FLWR_RUN_UNDECLARED keys: nothing differs silently."""
    import pathlib

    from fed_unlearn.config import (
        FLWR_RUN_DEFAULTS,
        FLWR_RUN_UNDECLARED,
        flat_defaults,
    )
    from simulations.docs import flwr_app_config

    app = flwr_app_config(pathlib.Path(__file__).resolve().parent.parent)
    defaults = flat_defaults()
    want = {**defaults, **FLWR_RUN_DEFAULTS}
    for key in FLWR_RUN_UNDECLARED:
        del want[key]
    assert app == want
    assert {k: type(v) for k, v in app.items()} == {k: type(v) for k, v in want.items()}
    # every allowed difference is one (a stale entry fails too)
    assert all(defaults[k] != v for k, v in FLWR_RUN_DEFAULTS.items())
    # and a `flwr run` with no --run-config is the CLI run with those keys set
    assert (
        RunConfig.from_flat(app).resolved()
        == RunConfig.from_flat(FLWR_RUN_DEFAULTS).resolved()
    )


def test_named_unset_values_keep_the_values_that_travel_and_are_stored():
    """The names replace literals only: method configs (stored in run.json's
    method_config) and the wire keep 0 / 0.0 of the same types."""
    import dataclasses

    from fed_unlearn.config import ALL_ITEMS, FIFTH_OF_LR, OFF, PRESET, PRESET_FLAT
    from fed_unlearn.methods.base import NO_BUDGET, RUN_BATCH, RUN_LR
    from fed_unlearn.methods.foul import FoulConfig
    from fed_unlearn.methods.mpu import MPUConfig
    from fed_unlearn.training import NO_CAP

    named = (PRESET, PRESET_FLAT, ALL_ITEMS, OFF, FIFTH_OF_LR)
    assert named == (None, 0, 0, 0, 0.0)
    assert [type(v) for v in (RUN_LR, RUN_BATCH, NO_BUDGET, NO_CAP)] == [
        float,
        int,
        float,
        int,
    ]
    assert (RUN_LR, RUN_BATCH, NO_BUDGET, NO_CAP) == (0.0, 0, 0.0, 0)
    foul = dataclasses.asdict(FoulConfig())
    assert [foul[k] for k in ("local_steps", "lr", "recovery_batch_size")] == [0, 0, 0]
    assert isinstance(foul["lr"], float) and isinstance(foul["recovery_budget"], float)
    assert isinstance(dataclasses.asdict(MPUConfig())["lr"], float)


def test_qa_per_person_outside_the_synthetic_bounds_is_refused_before_any_work():
    """The synthetic data has one Q/A pair per attribute of a person, 10 to 16:
    a value outside that is the config's error, not a client's after Ray started;
    with a data-dir (the user's own data) the key is not read."""
    with pytest.raises(ConfigError, match="'qa-per-person' must be between 10 and 16"):
        RunConfig.from_flat({"preset": "tiny", "qa-per-person": 5})
    with pytest.raises(ConfigError, match="got 17"):
        RunConfig.from_flat({"preset": "tiny", "qa-per-person": 17})
    assert (
        RunConfig.from_flat({"preset": "tiny", "qa-per-person": 16}).qa_per_person == 16
    )
    own = RunConfig.from_flat({"preset": "tiny", "data-dir": "d", "qa-per-person": 5})
    assert own.qa_per_person == 5
