"""Round bookkeeping of interactive methods: curve, T2F stop, rollback, options."""

from __future__ import annotations

import pytest
import torch

from fed_unlearn.methods import UnlearnContext, get_method
from fed_unlearn.methods.rounds import RoundLog, loss_params


def _ctx(values, oracle=0.1, delta=0.02):
    """A context whose evaluator reads the forget prob stored in the adapter."""
    return UnlearnContext(
        trained={"x": torch.tensor([values[0]])},
        departed=(1,),
        remaining=(0,),
        seed=0,
        evaluate=lambda s: {
            "forget_Q_A_Prob": float(s["x"][0]),
            "retain_Q_A_Prob": 0.5,
        },
        forget_target=(oracle, delta),
    )


def _drive(log, values):
    log.start({"x": torch.tensor([values[0]])})
    for r, v in enumerate(values[1:], start=1):
        if log.end_round(r, {"x": torch.tensor([v])}):
            return r
    return len(values) - 1


def test_t2f_stops_at_the_first_round_in_the_oracle_band():
    values = [0.5, 0.3, 0.15, 0.11, 0.1, 0.1]
    log = RoundLog(_ctx(values), "t2f")
    assert _drive(log, values) == 3  # |0.11 - 0.1| <= 0.02
    assert log.stopped_by == "t2f" and not log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.11)
    assert [p["round"] for p in log.curve] == [0, 1, 2, 3]


def test_overshoot_rolls_back_to_the_closer_round():
    values = [0.5, 0.3, 0.13, 0.0]  # 0.13 is 0.03 away, 0.0 is 0.1 away
    log = RoundLog(_ctx(values), "t2f")
    assert _drive(log, values) == 3
    assert log.stopped_by == "overshoot" and log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.13)
    assert log.curve[-1]["round"] == 3
    assert log.curve[-1]["forget_Q_A_Prob"] == pytest.approx(0.13)


def test_overshoot_keeps_the_last_round_when_it_is_closer():
    values = [0.5, 0.3, 0.075]  # below 0.08 but closer than 0.3
    log = RoundLog(_ctx(values), "t2f")
    _drive(log, values)
    assert log.stopped_by == "overshoot" and not log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.075)


def test_budget_rule_and_missing_oracle_run_every_round():
    values = [0.5, 0.1, 0.1, 0.1]
    assert _drive(RoundLog(_ctx(values), "budget"), values) == 3
    ctx = _ctx(values)
    ctx.forget_target = None
    assert _drive(RoundLog(ctx, "t2f"), values) == 3


def test_client_compute_is_summed_over_replies():
    log = RoundLog(_ctx([0.5]), "budget")
    log.add_compute({0: (None, {"local-steps": 3, "tokens": 10, "train-seconds": 1.5})})
    log.add_compute({1: (None, {"local-steps": 2, "tokens": 5, "train-seconds": 0.5})})
    assert log.compute == {"local_steps": 5.0, "tokens": 15.0, "client_seconds": 2.0}


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match="stop must be one of"):
        RoundLog(_ctx([0.5]), "never")
    with pytest.raises(ValueError, match="not JSON"):
        loss_params("{beta: 1}")
    with pytest.raises(ValueError, match="not parameters of 'npo'"):
        get_method("mpu", {"loss_params": '{"nope": 1}'})
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        get_method("foul", {"kappa": -0.1})
    with pytest.raises(ValueError, match="copies"):
        get_method("mpu", {"copies": "1"})
    with pytest.raises(ValueError, match="retain must be one of"):
        get_method("local_unlearn", {"retain": "public"})
    # strings from the CLI are coerced to the field type
    assert get_method("foul", {"kappa": "0.5", "rounds": "3"}).config.kappa == 0.5


def test_foul_cached_mode_without_departed_history_is_a_clear_error(tmp_path):
    from test_methods import LinearClients, _state

    from fed_unlearn.history import HistoryStore, RoundRecord
    from fed_unlearn.methods import MissingRequirementError

    trained = _state()
    store = HistoryStore(tmp_path / "h")
    store.append(
        RoundRecord(
            round=1,
            global_state=trained,
            client_deltas={0: {k: 0.1 * v for k, v in trained.items()}},
            num_examples={0: 10},
            participants=[0],
        )
    )
    store.set_final(trained)
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        clients=LinearClients({0: _state(1), 1: _state(2)}),
    )
    with pytest.raises(
        MissingRequirementError, match=r"no update of client\(s\) \[1\]"
    ):
        get_method("foul").unlearn(ctx)
    with pytest.raises(MissingRequirementError, match="live mode needs departed"):
        get_method("foul", {"mode": "live"}).unlearn(ctx)


def test_foul_step_on_linear_clients_moves_away_from_the_forget_target():
    """Linear clients, small steps: away from the forget target, towards the retain one.

    (With large steps, κ ≥ 1 and η = 1, the step overshoots the retain quadratic:
    first-order conflict mitigation is only a local guarantee.)
    """
    from test_methods import _full_context, _state

    trained = _state()
    ctx, _, _ = _full_context(trained)
    opts = {"rounds": 3, "subnetwork": "all", "stop": "budget", "kappa": 0.5}
    res = get_method("foul", {**opts, "server_lr": 0.2}).unlearn(ctx)
    tgt_f, tgt_r = ctx.clients.targets[1], ctx.clients.targets[0]

    def dist(state, target):
        return sum(float((state[k] - target[k]).norm() ** 2) for k in state) ** 0.5

    assert dist(res.adapter, tgt_f) > dist(trained, tgt_f)
    assert dist(res.adapter, tgt_r) < dist(trained, tgt_r)
    for r in res.info["rounds"]:
        assert r["min_retain_inner"] >= -1e-6 and r["max_forget_inner"] <= 1e-6
