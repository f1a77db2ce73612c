"""Registry contract tests (peft style) and the two foundation methods."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import adapter_state, full_context

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


@pytest.mark.parametrize("name", sorted(METHOD_REGISTRY))
def test_contract_keys_shapes_and_no_mutation(name):
    trained = adapter_state()
    before = {k: v.clone() for k, v in trained.items()}
    ctx, _, _ = full_context(trained)
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
    ctx = UnlearnContext(trained=adapter_state(), departed=(1,), remaining=(0,), seed=0)
    with pytest.raises(MissingRequirementError, match=name):
        method.unlearn(ctx)


def test_none_returns_the_trained_adapter():
    trained = adapter_state()
    ctx, _, _ = full_context(trained)
    out = get_method("none").unlearn(ctx).adapter
    assert all(torch.equal(out[k], trained[k]) for k in trained)


def test_retrain_returns_the_oracle_and_needs_the_retrain_capability():
    trained = adapter_state()
    ctx, retrained, calls = full_context(trained)
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
    trained = adapter_state()
    opts = {"rounds": 1, "stop": "budget", "seed": 7} if name == "mpu" else {}
    opts = {**opts, "rounds": 1, "stop": "budget", "interleave_recovery": False}
    ctx0, _, _ = full_context(trained)
    plain = get_method(name, opts).unlearn(ctx0).adapter
    ctx, _, _ = full_context(trained)
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
    trained = adapter_state()
    opts = {"rounds": 1, "stop": "budget", **({"seed": 7} if name == "mpu" else {})}
    ctx_a, _, _ = full_context(trained)
    after_opts = {**opts, "recovery_rounds": 1, "interleave_recovery": False}
    after = get_method(name, after_opts).unlearn(ctx_a)
    ctx_b, _, _ = full_context(trained)
    inter = get_method(name, {**opts, "interleave_recovery": True}).unlearn(ctx_b)
    for k in trained:
        torch.testing.assert_close(inter.adapter[k], after.adapter[k])
    assert (after.rounds, inter.rounds) == (2, 1)
    assert [c for c, _ in ctx_b.clients.calls] == [(1,), (0,)]


def test_foul_recovery_round_asks_for_the_requested_batch_and_step_cap():
    """recovery_batch_size and local_steps travel in the recovery request (the
    run's batch when 0); a negative batch is refused."""
    trained = adapter_state()
    ctx, _, _ = full_context(trained)
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
    trained = adapter_state()
    opts = {"rounds": 1, "stop": "budget", "recovery_rounds": 1}
    ctx, _, _ = full_context(trained)
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


def test_only_retrain_is_the_oracle():
    """The orchestrator charges a method the oracle's cost only by this flag,
    never by the method's name."""
    flagged = sorted(n for n, e in METHOD_REGISTRY.items() if e.method_cls.is_oracle)
    assert flagged == ["retrain"]
