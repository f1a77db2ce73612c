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


def _full_context(trained):
    retrained = {k: v * 0.5 for k, v in trained.items()}
    calls = []

    def retrain():
        calls.append(1)
        return retrained

    from fed_unlearn.history import HistoryStore

    ctx = UnlearnContext(
        trained=trained,
        departed=(1,),
        remaining=(0,),
        seed=0,
        history=HistoryStore("/nonexistent"),
        retrain=retrain,
        clients=object(),  # type: ignore[arg-type]
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
