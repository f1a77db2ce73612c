"""Round bookkeeping of interactive methods: curve, T2F stop, rollback, options."""

from __future__ import annotations

import pytest
import torch
from helpers import LinearClients, adapter_state, full_context, one_round_history

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


def test_oracle_stops_at_the_first_round_in_the_oracle_band():
    values = [0.5, 0.3, 0.15, 0.11, 0.1, 0.1]
    log = RoundLog(_ctx(values), "oracle")
    assert _drive(log, values) == 3  # |0.11 - 0.1| <= 0.02
    assert log.stopped_by == "oracle" and not log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.11)
    assert [p["round"] for p in log.curve] == [0, 1, 2, 3]


def test_overshoot_rolls_back_to_the_closer_round():
    values = [0.5, 0.3, 0.13, 0.0]  # 0.13 is 0.03 away, 0.0 is 0.1 away
    log = RoundLog(_ctx(values), "oracle")
    assert _drive(log, values) == 3
    assert log.stopped_by == "overshoot" and log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.13)
    assert log.curve[-1]["round"] == 3
    assert log.curve[-1]["forget_Q_A_Prob"] == pytest.approx(0.13)


def test_overshoot_keeps_the_last_round_when_it_is_closer():
    values = [0.5, 0.3, 0.075]  # below 0.08 but closer than 0.3
    log = RoundLog(_ctx(values), "oracle")
    _drive(log, values)
    assert log.stopped_by == "overshoot" and not log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.075)


def test_budget_runs_every_round_and_oracle_needs_a_simulation():
    values = [0.5, 0.1, 0.1, 0.1]
    assert _drive(RoundLog(_ctx(values), "budget"), values) == 3
    ctx = _ctx(values)
    ctx.forget_target = None
    with pytest.raises(ValueError, match="only a simulation has; use stop='budget'"):
        RoundLog(ctx, "oracle")
    with pytest.raises(ValueError, match="now stop='oracle'"):
        RoundLog(ctx, "t2f")


def _audit_ctx(values):
    """No oracle, no evaluator: the 'adapter' is the departed client's gap."""
    ctx = _ctx(values)
    ctx.forget_target, ctx.evaluate = None, None
    ctx.audit = lambda s: float(s["x"][0])
    return ctx


def test_self_audit_stops_when_the_gap_is_within_tolerance():
    values = [0.2, 0.1, 0.05, 0.015, 0.0]  # tol 0.1 * 0.2 = 0.02
    log = RoundLog(_audit_ctx(values), "self_audit", audit_tol=0.1)
    assert _drive(log, values) == 3
    assert log.stopped_by == "self_audit" and not log.rolled_back
    assert log.info()["audit_gaps"] == pytest.approx([0.2, 0.1, 0.05, 0.015])
    assert float(log.result({})["x"][0]) == pytest.approx(0.015)


def test_self_audit_overshoot_keeps_the_smaller_gap():
    values = [0.2, 0.05, -0.1]  # -0.1 < -0.02; |0.05| < |-0.1|: keep round 1
    log = RoundLog(_audit_ctx(values), "self_audit")
    assert _drive(log, values) == 2
    assert log.stopped_by == "audit_overshoot" and log.rolled_back
    assert float(log.result({})["x"][0]) == pytest.approx(0.05)


def test_self_audit_needs_the_audit():
    ctx = _ctx([0.5])
    with pytest.raises(ValueError, match="audit-fraction > 0"):
        RoundLog(ctx, "self_audit")
    with pytest.raises(ValueError, match="audit_tol must be > 0"):
        get_method("mpu", {"stop": "self_audit", "audit_tol": 0})


def test_client_compute_is_summed_over_replies():
    from fed_unlearn.protocol import LocalUpdateReply

    def reply(cid, steps, tokens, seconds):
        return LocalUpdateReply(
            [],
            client_id=cid,
            num_examples=1,
            local_steps=steps,
            tokens=tokens,
            train_seconds=seconds,
            loss=0.0,
        )

    log = RoundLog(_ctx([0.5]), "budget")
    log.add_compute({0: reply(0, 3, 10, 1.5)})
    log.add_compute({1: reply(1, 2, 5, 0.5)})
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
    from fed_unlearn.methods import MissingRequirementError

    trained = adapter_state()
    store = one_round_history(
        tmp_path, trained, {0: {k: 0.1 * v for k, v in trained.items()}}
    )
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        clients=LinearClients({0: adapter_state(1), 1: adapter_state(2)}),
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
    trained = adapter_state()
    ctx, _, _ = full_context(trained)
    opts = {"rounds": 3, "subnetwork": "all", "stop": "budget", "kappa": 0.5}
    res = get_method("foul", {**opts, "server_lr": 0.2}).unlearn(ctx)
    tgt_f, tgt_r = ctx.clients.targets[1], ctx.clients.targets[0]

    def dist(state, target):
        return sum(float((state[k] - target[k]).norm() ** 2) for k in state) ** 0.5

    assert dist(res.adapter, tgt_f) > dist(trained, tgt_f)
    assert dist(res.adapter, tgt_r) < dist(trained, tgt_r)
    for r in res.info["rounds"]:
        assert r["min_retain_inner"] >= -1e-6 and r["max_forget_inner"] <= 1e-6


def _scalar_history(tmp_path, deltas, sizes=None):
    """History of one round over a one-tensor adapter ``{"x": [0.5]}``."""
    trained = {"x": torch.tensor([0.5])}
    deltas = {c: {"x": torch.tensor([d])} for c, d in deltas.items()}
    return trained, one_round_history(tmp_path, trained, deltas, sizes)


def test_foul_server_mode_contacts_no_client_and_steps_along_g0(tmp_path, monkeypatch):
    """κ = 0: d = g0 = size-weighted mean of the retain clients' cached
    pseudo-gradients (minus their deltas); the budget walks server_lr·d in all.
    The server's own time (history read and steps) is recorded, from the clock
    read before and after them."""
    import types

    import fed_unlearn.methods.foul.method as foul_method
    from fed_unlearn.methods import MissingRequirementError, Requirement

    ticks = iter([100.0, 103.25])
    monkeypatch.setattr(
        foul_method, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks))
    )

    trained, store = _scalar_history(
        tmp_path, {0: 0.4, 1: 0.1, 2: -2.0}, {0: 30, 1: 10, 2: 5}
    )
    opts = {"mode": "server", "kappa": 0.0, "subnetwork": "all", "stop": "budget"}
    method = get_method("foul", {**opts, "rounds": 4, "server_lr": 0.5})
    assert method.needs() == frozenset({Requirement.HISTORY})
    ctx = UnlearnContext(
        trained=trained, departed=(2,), remaining=(0, 1), seed=0, history=store
    )  # no clients at all
    res = method.unlearn(ctx)
    g0 = -(30 * 0.4 + 10 * 0.1) / 40  # = -0.325
    assert float(res.adapter["x"][0]) == pytest.approx(0.5 - 0.5 * g0)
    assert res.rounds == 0 and res.info["server_steps"] == 4
    assert res.info["server_step_seconds"] == 3.25
    assert res.info["client_compute"]["local_steps"] == 0
    steps = [r["step"] for r in res.info["rounds"]]
    assert steps == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert float(trained["x"][0]) == 0.5  # the input is not changed
    # recovery rounds need the remaining clients again
    with pytest.raises(MissingRequirementError, match="live_clients"):
        get_method("foul", {**opts, "recovery_rounds": 1}).unlearn(ctx)


def test_foul_share_step_is_as_long_as_the_departed_contribution(tmp_path):
    """server_step=share, κ = 0: the step along d = g0 is as long as the
    departed client's FedAvg share p_f·|g_f| of the update, times server_lr."""
    trained, store = _scalar_history(
        tmp_path, {0: 0.4, 1: 0.1, 2: -2.0}, {0: 30, 1: 10, 2: 5}
    )
    opts = {"mode": "server", "kappa": 0.0, "subnetwork": "all", "stop": "budget"}
    method = get_method("foul", {**opts, "server_step": "share", "server_lr": 0.5})
    ctx = UnlearnContext(
        trained=trained, departed=(2,), remaining=(0, 1), seed=0, history=store
    )
    res = method.unlearn(ctx)
    g0 = -(30 * 0.4 + 10 * 0.1) / 40  # -0.325, the retain clients' mean
    share = 5 / 45 * 2.0  # p_f |g_f|: g_f = -(-2.0) = 2.0
    eta = 0.5 * share / abs(g0)
    assert float(res.adapter["x"][0]) == pytest.approx(0.5 - eta * g0)
    assert res.info["rounds"][0]["total_step"] == pytest.approx(eta)
    with pytest.raises(ValueError, match="server_step must be one of"):
        get_method("foul", {"server_step": "oracle"})


@pytest.mark.parametrize("server_step", ["fixed", "share"])
def test_foul_remove_direction_subtracts_the_departed_share(tmp_path, server_step):
    """server_direction=remove: the departed client added p_f·Δ_f = 5/45·(-2.0)
    to the global adapter; a total step of server_lr = 0.5 takes back half of
    that, whatever κ and whichever server_step."""
    trained, store = _scalar_history(
        tmp_path, {0: 0.4, 1: 0.1, 2: -2.0}, {0: 30, 1: 10, 2: 5}
    )
    opts = {"mode": "server", "subnetwork": "all", "stop": "budget", "kappa": 0.9}
    method = get_method(
        "foul",
        {
            **opts,
            "server_direction": "remove",
            "server_step": server_step,
            "server_lr": 0.5,
        },
    )
    ctx = UnlearnContext(
        trained=trained, departed=(2,), remaining=(0, 1), seed=0, history=store
    )
    res = method.unlearn(ctx)
    assert float(res.adapter["x"][0]) == pytest.approx(0.5 - 0.5 * (5 / 45) * -2.0)
    assert res.info["rounds"][0]["direction"] == "remove"
    with pytest.raises(ValueError, match="server_direction must be one of"):
        get_method("foul", {"server_direction": "sideways"})
    with pytest.raises(ValueError, match="is a step of mode='server'"):
        get_method("foul", {"server_direction": "remove", "mode": "cached"})


def test_foul_rollback_returns_the_earlier_round_not_the_overshoot(tmp_path):
    """x falls by 0.18 a step: 0.5, 0.32, 0.14, -0.04. Oracle 0.1 ± 0.02: -0.04
    overshoots, and 0.14 is closer to the oracle, so FOUL must return 0.14."""
    trained, store = _scalar_history(tmp_path, {0: -1.8, 1: 5.0})
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        evaluate=lambda s: {"forget_Q_A_Prob": float(s["x"][0]), "retain_Q_A_Prob": 0},
        forget_target=(0.1, 0.02),
    )
    opts = {"mode": "server", "kappa": 0.0, "subnetwork": "all", "rounds": 10}
    res = get_method("foul", {**opts, "stop": "oracle"}).unlearn(ctx)
    assert res.info["stopped_by"] == "overshoot" and res.info["rolled_back"]
    assert float(res.adapter["x"][0]) == pytest.approx(0.14)
    assert res.info["server_steps"] == 3
    assert res.info["curve"][-1]["forget_Q_A_Prob"] == pytest.approx(0.14)


def test_foul_new_option_errors_name_the_option():
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        get_method("foul", {"wire_dtype": "int8"})
    with pytest.raises(ValueError, match="recovery_rounds must be >= 0"):
        get_method("foul", {"recovery_rounds": -1})
    with pytest.raises(ValueError, match="mode must be one of"):
        get_method("foul", {"mode": "offline"})


def _rank_case():
    """A 2 x 3 lora_A and a 3 x 2 lora_B at zero; the departed client's update
    sits on A's row 1 and B's column 0, the retain client's is 0.1 everywhere."""
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    trained = {a: torch.zeros(2, 3), b: torch.zeros(3, 2)}
    forget = {a: torch.full((2, 3), 0.01), b: torch.full((3, 2), 0.01)}
    forget[a][1] = 5.0
    forget[b][:, 0] = 5.0
    retain = {a: torch.full((2, 3), 0.1), b: torch.full((3, 2), 0.1)}
    return a, b, trained, forget, retain


def test_foul_rank_granularity_selects_rows_of_a_and_columns_of_b(tmp_path):
    """Units: rows of A, columns of B. The departed client's update sits on A's
    row 1 and B's column 0, so the ratio rule (top half of 4 units) picks those
    two; κ = 0 and one budget step of η = 1 add the retain mean (0.1) there and
    leave every other entry alone."""
    from fed_unlearn.methods.foul import SubNetwork, rank_units

    a, b, trained, forget, retain = _rank_case()
    units = rank_units(forget)
    assert sorted(units) == [f"{a}#0", f"{a}#1", f"{b}#0", f"{b}#1"]
    assert torch.equal(units[f"{b}#0"], forget[b][:, 0])
    store = one_round_history(tmp_path, trained, {0: retain, 1: forget})
    ctx = UnlearnContext(
        trained=trained, departed=(1,), remaining=(0,), seed=0, history=store
    )
    opts = {
        "mode": "server",
        "granularity": "rank",
        "top_p": 0.5,
        "kappa": 0.0,
        "rounds": 1,
        "stop": "budget",
    }
    res = get_method("foul", opts).unlearn(ctx)
    want_a = torch.zeros(2, 3)
    want_a[1] = 0.1
    want_b = torch.zeros(3, 2)
    want_b[:, 0] = 0.1
    assert torch.allclose(res.adapter[a], want_a)
    assert torch.allclose(res.adapter[b], want_b)
    assert res.info["subnetwork"]["params"] == 6
    assert res.info["subnetwork"]["tensors"] == 2
    # SubNetwork.flatten reads exactly the selected entries, A's row then B's column
    sub = SubNetwork.from_units([f"{a}#1", f"{b}#0"], trained)
    state = {a: torch.arange(6.0).reshape(2, 3), b: torch.arange(6.0).reshape(3, 2)}
    assert sub.flatten(state).tolist() == [3.0, 4.0, 5.0, 0.0, 2.0, 4.0]
    # what travels: A's row 1 (1 x 3) and B's column 0 (3 x 1), in that order
    assert sub.ranks == {a: [1], b: [0]}
    sent = sub.gather(state)
    assert sent[a].tolist() == [[3.0, 4.0, 5.0]]
    assert sent[b].tolist() == [[0.0], [2.0], [4.0]]
    assert sub.flatten_gathered(sent).tolist() == sub.flatten(state).tolist()
    # two of three columns of B: row-major slices keep flatten's order
    wide = {b: torch.arange(9.0).reshape(3, 3)}
    sub2 = SubNetwork.from_units([f"{b}#2", f"{b}#0"], wide)
    assert sub2.gather(wide)[b].tolist() == [[0.0, 2.0], [3.0, 5.0], [6.0, 8.0]]
    assert sub2.flatten(wide).tolist() == [0.0, 2.0, 3.0, 5.0, 6.0, 8.0]


def test_foul_cached_rank_mode_sends_only_the_selected_ranks(tmp_path):
    """granularity=rank in cached mode: the request names the ranks, the copy
    holds only A's row 1 and B's column 0, round 1's base holds both tensors
    whole; with κ = 0 and one step of η = 1 the retain client's linear pull
    (0.5 (t - x)) lands on exactly those entries; info counts θ_V's bytes."""

    a, b, trained, forget, retain = _rank_case()
    target = {a: torch.arange(6.0).reshape(2, 3), b: torch.arange(6.0).reshape(3, 2)}
    clients = LinearClients({0: target})
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=one_round_history(tmp_path, trained, {0: retain, 1: forget}),
        clients=clients,
    )
    opts = {"granularity": "rank", "top_p": 0.5, "kappa": 0.0, "rounds": 1}
    res = get_method("foul", {**opts, "stop": "budget"}).unlearn(ctx)
    (_, config), req = clients.calls[0], clients.requests[0][0]
    assert req.ranks == {a: [1], b: [0]}
    assert config[f"ranks.{a}"] == [1] and config[f"ranks.{b}"] == [0]
    assert req.copies[0][a].shape == (1, 3)
    assert req.copies[0][b].shape == (3, 1)
    assert req.base[a].shape == (2, 3) and req.base[b].shape == (3, 2)
    want_a, want_b = torch.zeros(2, 3), torch.zeros(3, 2)
    want_a[1] = 0.5 * target[a][1]
    want_b[:, 0] = 0.5 * target[b][:, 0]
    assert torch.allclose(res.adapter[a], want_a)
    assert torch.allclose(res.adapter[b], want_b)
    assert res.info["subnetwork"]["bytes"] == 6 * 4


def _replies(deltas):
    from fed_unlearn.protocol import LocalUpdateReply

    return {
        cid: LocalUpdateReply(
            [d] if d is not None else [],
            client_id=cid,
            num_examples=n,
            local_steps=1,
            tokens=5,
            train_seconds=0.0,
            loss=0.0,
        )
        for cid, (d, n) in deltas.items()
    }


def test_an_invalid_update_names_its_client():
    from fed_unlearn.adapters import InvalidUpdateError
    from fed_unlearn.methods.rounds import copy_deltas

    like = {"w": torch.zeros(2)}
    replies = _replies(
        {
            0: ({"w": torch.ones(2)}, 10),
            3: ({"w": torch.tensor([1.0, float("nan")])}, 5),
        }
    )
    with pytest.raises(
        InvalidUpdateError, match="mpu: client 3's update is rejected.*NaN"
    ):
        copy_deltas(replies, like, "mpu")
    with pytest.raises(InvalidUpdateError, match="client 4's .*returned no update"):
        copy_deltas(_replies({4: (None, 1)}), like, "mpu")


def test_a_recovery_round_goes_on_without_an_invalid_update():
    """Clients 0 and 1 send deltas 1 and 3 (sizes 10, 30), client 2 a NaN: the
    round is FedAvg of the valid two, (10·1 + 30·3)/40 = 2.5, and the log says
    whom it left out and why."""
    from types import SimpleNamespace

    from fed_unlearn.methods.rounds import RoundLog, recovery_step

    theta = {"w": torch.zeros(1)}
    sent = {0: (1.0, 10), 1: (3.0, 30), 2: (float("nan"), 20)}

    class Clients:
        def query(self, requests):
            return _replies(
                {c: ({"w": torch.tensor([sent[c][0]])}, sent[c][1]) for c in requests}
            )

    ctx = SimpleNamespace(remaining=(0, 1, 2), clients=Clients())
    log = RoundLog(
        SimpleNamespace(evaluate=None, audit=None, forget_target=None), "budget"
    )
    out = recovery_step(ctx, theta, log, 1, "foul_server")
    assert float(out["w"][0]) == pytest.approx(2.5)
    assert list(log.info()["rejected_updates"]) == ["2"]
    assert "NaN" in log.info()["rejected_updates"]["2"]
    sent[0] = sent[1] = (float("inf"), 10)
    with pytest.raises(ValueError, match="every remaining client's recovery update"):
        recovery_step(ctx, theta, log, 2, "foul_server")


@pytest.mark.parametrize(("merge", "want"), [("mean", 2.5), ("sum", 10.0)])
def test_departed_steps_are_averaged_or_summed(merge, want):
    """Departed clients 1 and 2 step by +1 (10 examples) and +3 (30 examples)
    from θ = 0: ``mean`` applies their FedAvg, (10·1 + 30·3)/40 = 2.5; ``sum``
    applies both, 1 + 3 = 4, here with server_lr 2.5: 10."""
    steps = {1: (1.0, 10), 2: (3.0, 30)}

    class Clients:
        def query(self, requests):
            assert sorted(requests) == [1, 2]
            base = requests[1].copies[0]["w"]
            return _replies(
                {c: ({"w": base + steps[c][0]}, steps[c][1]) for c in requests}
            )

    ctx = UnlearnContext(
        trained={"w": torch.zeros(1)},
        departed=(1, 2),
        remaining=(0,),
        seed=0,
        clients=Clients(),
        departed_cooperates=True,
    )
    method = get_method(
        "local_unlearn",
        {
            "rounds": 1,
            "interleave_recovery": False,
            "departed_merge": merge,
            "server_lr": 2.5 if merge == "sum" else 1.0,
        },
    )
    res = method.unlearn(ctx)
    # mean: 1.0 · 2.5 = 2.5; sum: 2.5 · (1 + 3) = 10
    assert float(res.adapter["w"][0]) == pytest.approx(want)
    assert res.info["departed_merge"] == merge
    with pytest.raises(ValueError, match="departed_merge must be one of"):
        get_method("mpu", {"departed_merge": "max"})


def test_seed_streams_of_interleaved_and_final_recovery_do_not_collide():
    """mpu with R = 2 interleaved repairs (streams RECOVERY + 1, + 2) and one
    final recovery round: that round draws RECOVERY + 3, not RECOVERY + 1 again;
    the unlearning rounds use 1 and 2."""
    from fed_unlearn import seeds

    trained = adapter_state()
    clients = LinearClients({0: adapter_state(1), 1: adapter_state(2)})
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        clients=clients,
        departed_cooperates=True,
    )
    opts = {"rounds": 2, "recovery_rounds": 1}
    get_method("local_unlearn", opts).unlearn(ctx)
    used = [next(iter(q.values())).seed_round for q in clients.requests]
    r = seeds.RECOVERY
    assert used == [1, r + 1, 2, r + 2, r + 3]


def test_a_recovery_round_goes_on_with_the_clients_that_answered():
    """Clients 0 and 1 answer (deltas 1 and 3, sizes 10 and 30), client 2 drops
    out: the round is (10·1 + 30·3)/40 = 2.5 and the log names client 2; if
    nobody answers, the failure is raised."""
    from types import SimpleNamespace

    from fed_unlearn.methods import ClientFailure
    from fed_unlearn.methods.rounds import RoundLog, recovery_step

    theta = {"w": torch.zeros(1)}
    answers = _replies(
        {0: ({"w": torch.tensor([1.0])}, 10), 1: ({"w": torch.tensor([3.0])}, 30)}
    )

    class Clients:
        def __init__(self, replies):
            self.replies = replies

        def query(self, requests):
            raise ClientFailure("client 2 dropped", self.replies, {2: "dropped"})

    ctx = SimpleNamespace(remaining=(0, 1, 2), clients=Clients(answers))
    log = RoundLog(
        SimpleNamespace(evaluate=None, audit=None, forget_target=None), "budget"
    )
    out = recovery_step(ctx, theta, log, 1, "foul_server")
    assert float(out["w"][0]) == pytest.approx(2.5)
    assert log.info()["dropped_clients"] == {"2": "dropped"}
    ctx.clients = Clients({})
    with pytest.raises(ClientFailure, match="dropped"):
        recovery_step(ctx, theta, log, 2, "foul_server")
