"""Self-audit items: a share of each person's items kept out of FL training."""

import pytest

from clients.task import client_audit_items, client_items, dataset, full_dataset
from fed_unlearn.config import ConfigError, RunConfig
from fed_unlearn.data import generate_tofu
from fed_unlearn.data.audit import split_audit


def test_split_keeps_the_share_of_each_person():
    items = [it for c in generate_tofu(3, 2).clients.values() for it in c]
    trained, held = split_audit(items, 0.2, seed=3)
    assert len(trained) + len(held) == len(items)
    assert {it.question for it in trained}.isdisjoint(it.question for it in held)
    people = {it.person for it in items}
    for p in people:  # 10 items each: round(0.2 * 10) = 2 held out
        assert sum(it.person == p for it in held) == 2
    assert split_audit(items, 0.2, seed=3) == (trained, held)  # deterministic
    assert split_audit(items, 0.2, seed=4)[1] != held  # the seed decides which
    assert split_audit(items, 0.0, seed=3) == (items, [])
    # a person with one item keeps it for training; with 2, one is held out
    assert split_audit(items[:1], 0.5, 0) == (items[:1], [])
    assert len(split_audit(items[:2], 0.01, 0)[1]) == 1
    with pytest.raises(ValueError, match=r"audit-fraction must be in \[0, 1\)"):
        split_audit(items, 1.0, 0)


def test_clients_train_without_their_audit_items():
    cfg = RunConfig.from_flat({"preset": "tiny", "audit-fraction": 0.3, "seed": 5})
    full, trained = full_dataset(cfg), dataset(cfg)
    for c, items in full.clients.items():
        node = {"partition-id": c}
        assert client_items(cfg, node) == trained.clients[c]
        held = client_audit_items(cfg, node)
        assert len(held) == 3 * 3  # 3 people x round(0.3 * 10)
        assert sorted(i.question for i in trained.clients[c] + held) == sorted(
            i.question for i in items
        )
    # the forget set the server evaluates is the departed client's trained items
    assert trained.forget_items((2,)) == trained.clients[2]
    plain = RunConfig.from_flat({"preset": "tiny", "seed": 5})
    assert dataset(plain).clients == full.clients
    assert client_audit_items(plain, {"partition-id": 0}) == []


def test_audit_fraction_is_validated_and_keys_the_fl_phase():
    with pytest.raises(ConfigError, match="'audit-fraction' must be in"):
        RunConfig.from_flat({"audit-fraction": 1.5})
    a = RunConfig.from_flat({"preset": "tiny"})
    b = RunConfig.from_flat({"preset": "tiny", "audit-fraction": 0.2})
    assert a.fl_key(()) != b.fl_key(())
    assert a.fl_key(()) == RunConfig.from_flat(
        {"preset": "tiny", "audit-fraction": 0}
    ).fl_key(())
