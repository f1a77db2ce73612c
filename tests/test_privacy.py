"""The client's privacy policy: a floor on the examples behind what it returns."""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict

from fed_unlearn.config import RunConfig
from fed_unlearn.privacy import ClientPolicy, PolicyError, examples_behind
from fed_unlearn.protocol import EvaluateRequest, LocalUpdateRequest, TrainRequest
from server.channel import encode_request, run_record


@pytest.mark.parametrize(
    ("n", "epochs", "batch", "steps", "want"),
    [
        (30, 1, 1, 1, 1),  # one step of one example: the leak of issue 17
        (30, 2, 4, 0, 30),  # no cap: every item
        (30, 1, 4, 3, 12),  # 3 steps of 4
        (5, 3, 4, 0, 5),  # never more than the items held
        (30, 1, 8, 2, 16),
        (30, 0, 8, 0, 0),
    ],
)
def test_examples_behind_by_hand(n, epochs, batch, steps, want):
    assert examples_behind(n, epochs, batch, steps) == want


def test_policy_reads_the_node_config_and_refuses_bad_floors():
    assert ClientPolicy.from_node_config({}).min_examples == 8
    assert ClientPolicy.from_node_config({"min-examples": 16}).min_examples == 16
    assert ClientPolicy.from_node_config({"min-examples": "3"}).min_examples == 3
    for bad in (0, -2, "abc", "2.5", 2.5, True):
        with pytest.raises(PolicyError, match="'min-examples' must be an int >= 1"):
            ClientPolicy.from_node_config({"min-examples": bad})
    policy = ClientPolicy(8)
    policy.check("x", 8)  # at the floor: allowed
    with pytest.raises(PolicyError, match="refused x: it would rest on 7 example"):
        policy.check("x", 7)


def _context(node_config):
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )


def test_client_refuses_a_single_example_update_before_any_work():
    """``foul_server --opt recovery_batch_size=1 --opt local_steps=1`` asks each
    client for one step on one example; the client refuses, keeps nothing of
    the request (its base adapter is not stored) and names the floor."""
    from clients.unlearn import local_update

    req = LocalUpdateRequest(
        copies=[{"w": torch.zeros(2)}],
        base={"v": torch.zeros(2)},
        loss="nll",
        batch_size=1,
        max_steps=1,
    )
    context = _context({"partition-id": 0, "num-partitions": 3})
    cfg = RunConfig(preset="tiny", num_clients=3).resolved()
    with pytest.raises(PolicyError, match="rest on 1 example.*floor of 8"):
        local_update(req, context, cfg)
    assert not context.state
    # a node that sets a stricter floor refuses what the default allows
    req = LocalUpdateRequest(
        copies=[{"w": torch.zeros(2)}], loss="nll", batch_size=4, max_steps=3
    )
    strict = _context({"partition-id": 0, "num-partitions": 3, "min-examples": 16})
    with pytest.raises(PolicyError, match="rest on 12 example.*floor of 16"):
        local_update(req, strict, cfg)


def test_client_with_too_few_items_refuses_fl_training_and_evaluation():
    from clients.client_app import evaluate, train

    cfg = RunConfig(
        preset="tiny", num_clients=2, depart="1", people_per_client=1, qa_per_person=10
    )
    run, adapter = run_record(cfg), {"w": torch.zeros(2)}
    train_msg = SimpleNamespace(
        content=encode_request(TrainRequest(adapter, server_round=1), run)
    )
    eval_msg = SimpleNamespace(content=encode_request(EvaluateRequest(adapter), run))
    # 10 items, below a floor of 12
    context = _context({"partition-id": 0, "num-partitions": 2, "min-examples": 12})
    with pytest.raises(PolicyError, match="FL training in round 1.*rest on 10"):
        train(train_msg, context)
    with pytest.raises(PolicyError, match="federated evaluation.*rest on 10"):
        evaluate(eval_msg, context)


def test_a_budget_request_is_sized_up_to_the_floor_not_refused(monkeypatch):
    """A budget of 1/6 over 1 round x 1 epoch x 30 items is 5 examples in 2
    steps (batches of 3): below the floor. A budget lets the client size its
    batches, so it takes batches of 4 (8 examples) and goes on to the model."""
    import clients.unlearn as unlearn

    class Reached(Exception):
        pass

    def no_model(cfg):
        raise Reached

    monkeypatch.setattr(unlearn, "client_model", no_model)
    req = LocalUpdateRequest(
        copies=[{"w": torch.zeros(2)}], loss="nll", budget=1 / 6, max_steps=2
    )
    cfg = RunConfig(
        preset="tiny", num_clients=3, num_server_rounds=1, local_epochs=1
    ).resolved()
    with pytest.raises(Reached):  # past the policy check, at the model
        unlearn.local_update(req, _context({"partition-id": 0}), cfg)
    # with a floor above the client's 30 items there is nothing to size up to
    with pytest.raises(PolicyError, match="rest on 30 example.*floor of 40"):
        unlearn.local_update(
            req, _context({"partition-id": 0, "min-examples": 40}), cfg
        )
