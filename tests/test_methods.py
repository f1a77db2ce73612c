"""Registry contract tests (peft style) and the two foundation methods."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fed_unlearn.methods import (
    METHOD_REGISTRY,
    MissingRequirementError,
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    get_method,
    list_methods,
    register_method,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(2, 4, generator=g),
        "m.lora_B.weight": torch.randn(3, 2, generator=g),
    }


class LinearClients:
    """In-process stand-in for the Flower channel with linear client maps.

    Client ``c`` pulls every tensor it receives towards its own target ``t_c``
    (``nll``: delta = 0.5 (t_c - x)) or pushes it away (any unlearning loss:
    delta = -0.5 (t_c - x)), for every ``copy<k>.*`` tensor, filling the rest
    from ``base.*`` (a tensor named in the request's ``ranks`` travels as those
    ranks of it, and so does its target). Enough to exercise a method's
    contract without Flower.
    """

    def __init__(self, targets):
        self.targets = targets
        self.calls = []
        self.arrays = []

    def query(self, clients, kind, arrays, config):
        import json

        from fed_unlearn.adapters import take_ranks

        assert kind == "local-update"
        self.calls.append((tuple(clients), dict(config)))
        self.arrays.append(arrays)
        ranks = json.loads(config.get("ranks", "{}"))
        out = {}
        for cid in clients:
            state = arrays[cid] if cid in arrays else arrays
            sign = 1.0 if config.get("loss", "nll") == "nll" else -1.0
            got = {}
            for key, x in state.items():
                if key.startswith("base."):
                    continue
                name = key.split(".", 1)[1]
                target = self.targets[cid][name]
                if name in ranks:  # the copy is a slice of these ranks
                    target = take_ranks(target, name, ranks[name])
                got[key] = sign * 0.5 * (target - x)
            out[cid] = (got, {"num-examples": 10, "local-steps": 1, "tokens": 5})
        return out


def _full_context(trained, tmp_path=None):
    import tempfile

    from fed_unlearn.history import HistoryStore, RoundRecord

    retrained = {k: v * 0.5 for k, v in trained.items()}
    calls = []

    def retrain():
        calls.append(1)
        return retrained

    root = tmp_path or tempfile.mkdtemp()
    store = HistoryStore(f"{root}/history")
    targets = {c: _state(10 + c) for c in (0, 1)}
    deltas = {
        c: {k: 0.1 * (targets[c][k] - trained[k]) for k in trained} for c in (0, 1)
    }
    # a FedAvg history (equal weights) that ends at ``trained``
    step = {k: (deltas[0][k] + deltas[1][k]) / 2 for k in trained}
    for r in (1, 2):
        store.append(
            RoundRecord(
                round=r,
                global_state={k: trained[k] - (3 - r) * step[k] for k in trained},
                client_deltas=deltas,
                num_examples={0: 10, 1: 10},
                participants=[0, 1],
            )
        )
    store.set_final(trained)
    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=store,
        retrain=retrain,
        clients=LinearClients(targets),
        departed_cooperates=True,
    )
    return ctx, retrained, calls


@pytest.mark.parametrize("name", sorted(METHOD_REGISTRY))
def test_contract_keys_shapes_and_no_mutation(name):
    trained = _state()
    before = {k: v.clone() for k, v in trained.items()}
    ctx, _, _ = _full_context(trained)
    out = get_method(name).unlearn(ctx).adapter
    assert set(out) == set(trained)
    assert all(out[k].shape == trained[k].shape for k in out)
    assert all(torch.equal(trained[k], before[k]) for k in trained)
    assert all(out[k].data_ptr() != trained[k].data_ptr() for k in out)


@pytest.mark.parametrize(
    "name",
    [n for n in sorted(METHOD_REGISTRY) if METHOD_REGISTRY[n].method_cls.requires],
)
def test_contract_missing_requirement_is_a_clear_error(name):
    method = get_method(name)
    ctx = UnlearnContext(trained=_state(), departed=(1,), remaining=(0,), seed=0)
    with pytest.raises(MissingRequirementError, match=name):
        method.unlearn(ctx)


def test_none_returns_the_trained_adapter():
    trained = _state()
    ctx, _, _ = _full_context(trained)
    out = get_method("none").unlearn(ctx).adapter
    assert all(torch.equal(out[k], trained[k]) for k in trained)


def test_retrain_returns_the_oracle_and_needs_the_retrain_capability():
    trained = _state()
    ctx, retrained, calls = _full_context(trained)
    out = get_method("retrain").unlearn(ctx).adapter
    assert calls == [1]
    assert all(torch.equal(out[k], retrained[k]) for k in trained)
    assert Requirement.RETRAIN in METHOD_REGISTRY["retrain"].method_cls.requires


def test_registry_rejects_bad_and_duplicate_names():
    @dataclass(kw_only=True)
    class Cfg(UnlearnConfig):
        pass

    class M(UnlearningMethod):
        def unlearn(self, ctx):  # pragma: no cover - never called
            raise NotImplementedError

    with pytest.raises(ValueError, match="already registered"):
        register_method("none", Cfg, M)
    with pytest.raises(ValueError, match="snake_case"):
        register_method("Bad-Name", Cfg, M)
    with pytest.raises(ValueError, match="UnlearnConfig"):
        register_method("ok_name", dict, M)  # type: ignore[arg-type]
    assert "ok_name" not in METHOD_REGISTRY


def test_get_method_errors_name_the_problem():
    with pytest.raises(KeyError, match="unknown method 'foul2'.*none"):
        get_method("foul2")
    with pytest.raises(ValueError, match="has no option 'kappa'"):
        get_method("none", {"kappa": 1.0})


def test_list_methods_has_one_line_each():
    rows = {name: (summary, reqs) for name, summary, reqs in list_methods()}
    assert set(rows) == set(METHOD_REGISTRY)
    assert all(summary and "\n" not in summary for summary, _ in rows.values())
    assert rows["retrain"][1] == ["retrain"]


@pytest.mark.parametrize("name", ["local_unlearn", "mpu"])
def test_recovery_rounds_are_fedavg_of_the_remaining_clients(name):
    """Two recovery rounds pull the unlearned adapter towards the remaining
    client's target: theta <- theta + 0.5 (t0 - theta), twice (linear clients)."""
    trained = _state()
    opts = {"rounds": 1, "stop": "budget", "seed": 7} if name == "mpu" else {}
    opts = {**opts, "rounds": 1, "stop": "budget", "interleave_recovery": False}
    ctx0, _, _ = _full_context(trained)
    plain = get_method(name, opts).unlearn(ctx0).adapter
    ctx, _, _ = _full_context(trained)
    res = get_method(name, {**opts, "recovery_rounds": 2}).unlearn(ctx)
    t0 = ctx.clients.targets[0]
    for k in trained:
        want = t0[k] + 0.25 * (plain[k] - t0[k])
        torch.testing.assert_close(res.adapter[k], want, rtol=1e-5, atol=1e-5)
    assert res.rounds == 3 and res.info["recovery_rounds"] == 2
    tail = ctx.clients.calls[-2:]
    assert all(c == (0,) and cfg["loss"] == "nll" for c, cfg in tail)
    with pytest.raises(ValueError, match="recovery_rounds"):
        get_method(name, {"recovery_rounds": -1})


@pytest.mark.parametrize("name", ["local_unlearn", "mpu"])
def test_interleaved_recovery_repairs_inside_each_round(name):
    """With one round, interleaving equals one recovery round after it, but the
    repaired model is the round's own (evaluated, logged) model."""
    trained = _state()
    opts = {"rounds": 1, "stop": "budget", **({"seed": 7} if name == "mpu" else {})}
    ctx_a, _, _ = _full_context(trained)
    after_opts = {**opts, "recovery_rounds": 1, "interleave_recovery": False}
    after = get_method(name, after_opts).unlearn(ctx_a)
    ctx_b, _, _ = _full_context(trained)
    inter = get_method(name, {**opts, "interleave_recovery": True}).unlearn(ctx_b)
    for k in trained:
        torch.testing.assert_close(inter.adapter[k], after.adapter[k])
    assert (after.rounds, inter.rounds) == (2, 1)
    assert [c for c, _ in ctx_b.clients.calls] == [(1,), (0,)]


def test_foul_recovery_round_asks_for_the_requested_batch_and_step_cap():
    """recovery_batch_size and local_steps travel in the recovery request (the
    run's batch when 0); a negative batch is refused."""
    trained = _state()
    ctx, _, _ = _full_context(trained)
    opts = {"mode": "server", "rounds": 1, "stop": "budget", "recovery_rounds": 1}
    get_method("foul", {**opts, "recovery_batch_size": 12, "local_steps": 2}).unlearn(
        ctx
    )
    clients, config = ctx.clients.calls[-1]
    assert clients == (0,)
    assert config["batch-size"] == 12 and config["max-steps"] == 2
    get_method("foul", opts).unlearn(ctx)
    assert "batch-size" not in ctx.clients.calls[-1][1]
    with pytest.raises(ValueError, match="recovery_batch_size must be >= 0"):
        get_method("foul", {"recovery_batch_size": -1})


def test_foul_server_recovery_asks_for_a_budget_unless_told_a_batch_or_an_epoch():
    """foul_server's recovery request carries its 1/6 budget and 2-step cap and
    no batch (the client sizes its batches); an explicit recovery_batch_size or a
    whole epoch (local_steps=0) sends no budget; a bad budget is refused."""
    trained = _state()
    opts = {"rounds": 1, "stop": "budget"}
    ctx, _, _ = _full_context(trained)
    get_method("foul_server", opts).unlearn(ctx)
    config = ctx.clients.calls[-1][1]
    assert config["budget"] == pytest.approx(1 / 6) and config["max-steps"] == 2
    assert "batch-size" not in config
    get_method("foul_server", {**opts, "recovery_batch_size": 12}).unlearn(ctx)
    config = ctx.clients.calls[-1][1]
    assert config["batch-size"] == 12 and "budget" not in config
    get_method("foul_server", {**opts, "local_steps": 0}).unlearn(ctx)
    config = ctx.clients.calls[-1][1]
    assert config["max-steps"] == 0 and "budget" not in config
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="recovery_budget must be a finite"):
            get_method("foul_server", {"recovery_budget": bad})
